"""Baseline attribution methods the ESVM ranking is compared against (no Ray here).

- :mod:`attribution.baselines.trak`: TRAK through the ``traker`` package.
- :mod:`attribution.baselines.datamodels`: Datamodels (random-subset models + sparse
  linear regression per target).

Both write rankings in the schema of :mod:`attribution.ranking` (methods ``trak`` and
``datamodels``), so the support stage and the report treat them like every other method.
"""
