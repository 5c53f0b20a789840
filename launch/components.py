"""TorchX components of the zoo.

Local (two processes on this host; or two "nodes" of one process each)::

    torchx run -s local_cwd launch/components.py:train -j 1x2 --config configs/experiments/din_synthetic.yaml
    torchx run -s local_cwd launch/components.py:train -j 2x1 --config configs/experiments/din_synthetic.yaml

Clusters: the same component with ``-s slurm`` or ``-s kubernetes`` (plus ``--image`` for Kubernetes and
scheduler options in ``.torchxconfig``), e.g. ``torchx run -s slurm launch/components.py:train -j 4x8
--gpu 8 --config ... train.device=cuda``. The local scheduler runs the ``torchrun`` found on PATH: run TorchX
from the project's environment (``.venv/bin`` first on PATH), as ``make train`` does.
"""


from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist


def train(
    *overrides: str,
    config: str = "configs/experiments/din_synthetic.yaml",
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    rdzv_port: int = 29500,
    max_retries: int = 0,
    max_restarts: int = 0,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Trains a zoo entry with ``python -m launch.train`` on ``j`` = NODESxPROCS_PER_NODE processes.

    Args:
        overrides: ``key.sub=value`` config overrides, passed through to launch.train.
        config: experiment YAML, relative to the working directory of the job.
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``1x2`` or ``2x1``.
        cpu: CPUs per replica (node).
        gpu: GPUs per replica; use with ``train.device=cuda``.
        memMB: memory per replica in MB.
        image: container image (Kubernetes / Docker schedulers; ignored by local_cwd).
        rdzv_port: rendezvous port on the first node.
        max_retries: replica retries on failure by the scheduler (Slurm, Kubernetes; the local schedulers do not
            retry), each resuming from the latest checkpoint.
        max_restarts: restarts of the worker group by torchrun's elastic agent when a worker dies (a kill -9, an
            OOM, a lost node's rendezvous): every worker restarts and resumes from the latest checkpoint; works on
            every scheduler, local ones included.
        env: extra environment variables.
        mounts: volume mounts (Kubernetes / Docker), e.g. a shared checkpoint directory.

    Returns:
        The TorchX AppDef.
    """
    app = dist.ddp(
        "--config",
        config,
        *overrides,
        m="launch.train",
        name="zoo-train",
        j=j,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        image=image,
        rdzv_port=rdzv_port,
        max_retries=max_retries,
        env={"OMP_NUM_THREADS": "1", **(env or {})},
        mounts=mounts,
    )
    if max_restarts:
        # dist.ddp's role runs `bash -c "torchrun ..."`; torchrun's own flag restarts the worker group.
        role = app.roles[0]
        cmd = role.args[-1]
        if not cmd.startswith("torchrun "):
            raise ValueError(f"unexpected torchx ddp command {cmd[:60]!r}: cannot add --max_restarts")
        role.args[-1] = cmd.replace("torchrun ", f"torchrun --max_restarts {int(max_restarts)} ", 1)
    return app
