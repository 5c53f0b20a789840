"""Entry points, trainer, sharding (planner, DMP, plans), optimizers and TorchX components."""
