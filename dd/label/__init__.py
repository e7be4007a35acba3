"""Human-in-the-loop artifact labelling (seed 000, Sec. 3.2; ``docs/labelling.md``).

* :mod:`dd.engines.mine`: run the detector over a pool, flag biased categories, pick hard cases.
* :mod:`dd.label.queue`: the labelling queue format (items, masks, decision log).
* :mod:`dd.label.serve`: the local labelling page (``static/``) on :mod:`dd.runtime.web`.
* :mod:`dd.engines.pseudo`: sharded, resumable, data-parallel pseudo-labelling.
* :mod:`dd.label.formats` and :mod:`dd.label.rle`: import/export (PNG, COCO RLE, Label
  Studio, CVAT, RichHF, queues).
* :mod:`dd.label.status`: class balance of datasets, progress of queues.
"""
