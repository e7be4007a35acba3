"""Data: image inputs (``images``), the dataset format (``datasets``), augmentation
(``augment``), samplers (``sampler``), synthetic data (``synth``) and the RichHF-18K
importer (``richhf``)."""
