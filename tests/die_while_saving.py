"""`python -m megatron_muon.launch` whose rank 0 dies inside a checkpoint save, as a node lost mid-save would.

Every rank writes its shards, then rank 0 (the coordinator) exits hard where torch_dist's writer would write the
checkpoint's global `.metadata`, together with the helper processes it started (the writer's multiprocessing
Manager), as when its node is lost: the new iteration directory is left with data files and no metadata, and no
Python cleanup (finally blocks, atexit) runs. Used by tests/test_checkpoint_training.py; not a test module.
"""

import multiprocessing
import os
import sys

from megatron.core.dist_checkpointing.strategies import filesystem_async

KILLED_EXIT_CODE = 43


def _die(self, metadata, results):
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(KILLED_EXIT_CODE)


filesystem_async.FileSystemWriterAsync.finish = _die

if __name__ == "__main__":
    from megatron_muon.launch import main

    main(sys.argv[1:])
