"""The libraries behind the baseline attribution methods (plain Python: no Ray, no stages).

- :mod:`attribution.baselines.trak`: TRAK through the ``traker`` package
  (:class:`~attribution.baselines.trak.TrakScorer`, checkpoint training).
- :mod:`attribution.baselines.datamodels`: Datamodels (seeded random-subset masks,
  margins, one sparse linear regression per target).

The registered methods ``"trak"`` and ``"datamodels"`` (:mod:`attribution.methods.trak`,
:mod:`attribution.methods.datamodels`) adapt them to the method interface; their stages
(:mod:`attribution.stages.trak`, :mod:`attribution.stages.datamodels`) write score
blocks and rankings like every other method's, so the support stage and the report
treat them alike.
"""
