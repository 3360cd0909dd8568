"""`arborl bench rewards`: scoring N responses with a slow verl reward, one call at a time (`verify.workers=1`, the
way rewards were called before the pool) against the bounded pool of threads (`verify.workers`) and of worker
processes (`verify.isolation=process`, its start included), side by side in one run."""

from __future__ import annotations

import time

from arborl.components.config import VerifyConfig
from arborl.components.verification.scoring import Sample, score_samples

SLEEPING_REWARD = "arborl.components.bench.rewards:sleeping_reward"
DELAY_S = 0.05


def sleeping_reward(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """A verl reward that waits `extra_info["delay_s"]` (a remote judge or a sandbox, say), then scores 1."""
    time.sleep(float((extra_info or {}).get("delay_s", DELAY_S)))
    return 1.0


def bench_rewards(responses: int = 1000, delay_s: float = DELAY_S, workers: int = 16) -> dict[str, float]:
    samples = [Sample(f"<answer> {i} </answer>", [str(i)], "bench", extra_info={"delay_s": delay_s})
               for i in range(responses)]
    seconds = {}
    for name, n, isolation in (("serial", 1, "thread"), ("pool", workers, "thread"),
                               ("process_pool", workers, "process")):
        cfg = VerifyConfig(reward={"default": SLEEPING_REWARD}, workers=n, isolation=isolation)
        started = time.perf_counter()
        out = score_samples(samples, cfg)
        seconds[name] = time.perf_counter() - started
        if any(o.reward != 1.0 for o in out):
            raise RuntimeError("the bench reward failed on some responses")
    return {"responses": responses, "delay_s": delay_s, "workers": workers,
            "serial_seconds": seconds["serial"], "pool_seconds": seconds["pool"],
            "process_pool_seconds": seconds["process_pool"], "speedup": seconds["serial"] / seconds["pool"],
            "process_speedup": seconds["serial"] / seconds["process_pool"]}
