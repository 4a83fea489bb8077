import os

# Every test process (and the ranks it spawns, which inherit the environment) uses one intra-op thread:
# several gloo ranks share two cores in CI, and oversubscription makes timings erratic.
os.environ.setdefault("OMP_NUM_THREADS", "1")
