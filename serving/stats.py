"""Serving statistics: latency percentiles, throughput, cache use, preemptions, and cost.

The cost line follows DeepSeek's day-6 inference report: accelerator time priced per hour,
divided by tokens. Prefill calls' wall time is charged to input tokens, everything else
(decode calls, scheduling, sampling) to output tokens.
"""

from __future__ import annotations

import array
import dataclasses

import numpy as np


@dataclasses.dataclass
class ServingStats:
    num_blocks: int
    requests: int = 0
    finished: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    prefill_s: float = 0.0
    started: float | None = None
    last: float | None = None
    blocks_used_sum: int = 0           # cache blocks in use, summed over the steps (for the mean)
    blocks_used_peak: int = 0
    # Latency samples for the percentiles, 8 bytes each (memory grows by 16 bytes a request, no more).
    ttft: array.array = dataclasses.field(default_factory=lambda: array.array("d"))
    tpot: array.array = dataclasses.field(default_factory=lambda: array.array("d"))

    def start(self, now: float) -> None:
        if self.started is None:
            self.started = now

    def step(self, now: float, used_blocks: int, preempted: int) -> None:
        self.steps += 1
        self.last = now
        self.blocks_used_sum += used_blocks
        self.blocks_used_peak = max(self.blocks_used_peak, used_blocks)
        self.preemptions += preempted

    def finish(self, ttft: float, tpot: float | None, preemptions: int) -> None:
        self.finished += 1
        self.ttft.append(ttft)
        if tpot is not None:
            self.tpot.append(tpot)

    @property
    def wall_s(self) -> float:
        return (self.last - self.started) if self.started is not None and self.last is not None else 0.0

    def summary(self, price_per_hour: float = 2.0, accelerators: int = 1) -> dict:
        wall = max(self.wall_s, 1e-9)
        decode_s = max(wall - self.prefill_s, 0.0)
        dollars_per_s = price_per_hour * accelerators / 3600
        per_m = lambda seconds, tokens: dollars_per_s * seconds / tokens * 1e6 if tokens else None  # noqa: E731
        pct = lambda xs, q: float(np.percentile(np.frombuffer(xs, np.float64), q)) if xs else None  # noqa: E731
        return dict(
            requests=self.requests, finished=self.finished, prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens, wall_s=wall, steps=self.steps,
            ttft_p50_s=pct(self.ttft, 50), ttft_p99_s=pct(self.ttft, 99),
            tpot_p50_s=pct(self.tpot, 50), tpot_p99_s=pct(self.tpot, 99),
            output_tokens_per_s=self.generated_tokens / wall,
            total_tokens_per_s=(self.prompt_tokens + self.generated_tokens) / wall,
            cache_utilisation_mean=self.blocks_used_sum / max(self.steps, 1) / self.num_blocks,
            cache_utilisation_peak=self.blocks_used_peak / self.num_blocks,
            preemptions=self.preemptions, price_per_accelerator_hour=price_per_hour,
            usd_per_m_input_tokens=per_m(self.prefill_s, self.prompt_tokens),
            usd_per_m_output_tokens=per_m(decode_s, self.generated_tokens))


def format_summary(s: dict) -> str:
    ms = lambda x: "n/a" if x is None else f"{1e3 * x:.1f} ms"  # noqa: E731
    usd = lambda x: "n/a" if x is None else f"${x:.3f}"  # noqa: E731
    return "\n".join([
        f"{s['requests']} requests ({s['finished']} finished), {s['prompt_tokens']} prompt + "
        f"{s['generated_tokens']} generated tokens in {s['wall_s']:.2f} s, {s['steps']} steps",
        f"TTFT p50 {ms(s['ttft_p50_s'])} p99 {ms(s['ttft_p99_s'])}; "
        f"TPOT p50 {ms(s['tpot_p50_s'])} p99 {ms(s['tpot_p99_s'])}",
        f"throughput {s['output_tokens_per_s']:.1f} output tok/s, {s['total_tokens_per_s']:.1f} total tok/s; "
        f"cache utilisation mean {s['cache_utilisation_mean']:.0%} peak {s['cache_utilisation_peak']:.0%}; "
        f"preemptions {s['preemptions']}",
        f"cost at ${s['price_per_accelerator_hour']:.2f}/accelerator-hour: {usd(s['usd_per_m_input_tokens'])} "
        f"per M input tokens, {usd(s['usd_per_m_output_tokens'])} per M output tokens",
    ])
