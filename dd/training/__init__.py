"""What every training job shares: learning-rate schedules and seeded draws (the loop
itself follows, issue 29). A layer above ``dd.runtime`` (and ``dd.report``), below the
engines."""
