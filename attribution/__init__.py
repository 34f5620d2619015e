"""Image data attribution: the method and its evaluation as plain Python (no Ray).

Stages, each reading and writing named artifacts in one experiment directory
(:class:`attribution.experiment.Experiment`): data -> backbones/pretraining ->
embeddings -> candidates + ESVM rankings -> retraining support -> baselines -> report.
"""

__version__ = "0.1.0"
