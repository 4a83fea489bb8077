"""Run an unmodified Megatron-LM training script with megatron-muon installed.

    python -m megatron_muon.launch pretrain_gpt.py --optimizer muon [Megatron flags ...]
    torchrun --nproc-per-node 8 -m megatron_muon.launch pretrain_gpt.py --optimizer muon ...

`install()` runs first, then the script runs as `__main__` with its own arguments and its directory on
sys.path (as `python pretrain_gpt.py` would). On a machine without CUDA the CPU shims are applied too, so
the same command runs a small model on CPU with `--distributed-backend gloo`.
"""

from __future__ import annotations

import os
import runpy
import sys


def prepare_process() -> bool:
    """Install the plugin (and the CPU shims without CUDA) and make a plain process rank 0 of 1; True with CUDA."""
    import torch

    import megatron_muon

    cuda = torch.cuda.is_available()
    megatron_muon.install()
    if not cuda:
        from megatron_muon.integration import cpu_shims

        cpu_shims.apply()
    if "RANK" not in os.environ:
        # A plain `python -m ...` is one rank; Megatron's rendezvous still wants an address.
        from megatron_muon.testing.ranks import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    return cuda


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    script, *script_args = argv
    if not os.path.isfile(script):
        raise SystemExit(f"megatron_muon.launch: no such training script: {script}")

    prepare_process()
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
