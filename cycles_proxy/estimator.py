"""Learned per-model rates, so reservations track what requests really cost.

For every model the estimator learns, from completed requests whose upstream reported its own
timings, how long prefill takes per prompt token and decode per generated token, and how long
answers typically are. An estimate is then ``(prompt tokens x prefill + output tokens x decode)``
times a safety factor, bounded by the configured maximum; with no history it falls back to the
configured default duration. Rates persist in the ledger file, so a restart keeps what was learned.

Over-estimating only holds budget briefly (the unused part is released at commit); under-estimating
is governed by the overage policy. The estimate/actual ratio of every request is recorded.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from cycles_proxy.pricing import CHARS_PER_TOKEN, DEFAULT_OUTPUT_TOKENS, NS_PER_S, Price, Pricing

#: weight of a new observation in the moving averages
ALPHA = 0.2
#: observations before learned rates replace the configured default
MIN_SAMPLES = 3
#: recent output lengths kept per model for the "typical length" (its 90th percentile)
LENGTH_WINDOW = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_rates (
    model                TEXT PRIMARY KEY,
    prefill_ns_per_token REAL NOT NULL,
    decode_ns_per_token  REAL NOT NULL,
    overhead_ns          REAL NOT NULL,
    samples              INTEGER NOT NULL,
    lengths              TEXT NOT NULL,
    updated_ms           INTEGER NOT NULL
)
"""


@dataclass(slots=True)
class ModelRates:
    prefill_ns_per_token: float
    decode_ns_per_token: float
    #: billed time beyond prefill and decode (model loads, wall-time overheads)
    overhead_ns: float = 0.0
    samples: int = 0
    lengths: deque[int] = field(default_factory=lambda: deque(maxlen=LENGTH_WINDOW))

    def typical_output(self) -> int | None:
        if not self.lengths:
            return None
        ordered = sorted(self.lengths)
        return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class Estimate:
    amount: int
    tokens_in: int
    tokens_out: int
    #: "learned" or "default"
    source: str
    #: the affordable-tokens line: cost(n output tokens) = base + per_token * n (units, >= 0)
    base: float
    per_token: float


class Estimator:
    def __init__(
        self,
        pricing: Pricing,
        *,
        default_seconds: float,
        max_seconds: float,
        safety_factor: float = 1.25,
        learn: bool = True,
        db: Path | None = None,
    ) -> None:
        self.pricing = pricing
        self._default_ns = int(default_seconds * NS_PER_S)
        self._max_ns = int(max_seconds * NS_PER_S)
        self.safety = safety_factor
        self.learn = learn
        self._rates: dict[str, ModelRates] = {}
        self._dirty: set[str] = set()
        self._lock = threading.Lock()
        self._db_path = db
        if db is not None and learn:
            self._load(db)

    # --- estimating ------------------------------------------------------------------------
    def estimate(self, model: str, input_chars: int, max_output_tokens: int | None) -> Estimate:
        price = self.pricing.price(model)
        tokens_in = -(-input_chars // CHARS_PER_TOKEN)
        rates = self._rates.get(model) if self.learn else None
        if rates is not None and rates.samples >= MIN_SAMPLES:
            typical = rates.typical_output()
            if max_output_tokens is not None:
                tokens_out = max_output_tokens
            else:
                tokens_out = typical if typical is not None else DEFAULT_OUTPUT_TOKENS
            prefill = rates.prefill_ns_per_token * self.safety
            decode = rates.decode_ns_per_token * self.safety
            overhead = rates.overhead_ns * self.safety
            source = "learned"
        else:
            tokens_out = DEFAULT_OUTPUT_TOKENS if max_output_tokens is None else max_output_tokens
            # the prior: the default duration pays for a default-length answer
            prefill = overhead = 0.0
            decode = self._default_ns / DEFAULT_OUTPUT_TOKENS
            source = "default"
        base = _cost(price, overhead + tokens_in * prefill, tokens_in, 0)
        per_token = _cost(price, decode, 0, 1)
        if source == "default":
            # nothing learned: the configured default duration, whatever the requested length
            gpu_ns = float(self._default_ns)
        else:
            gpu_ns = overhead + tokens_in * prefill + tokens_out * decode
        gpu_ns = min(gpu_ns, float(self._max_ns))
        amount = max(1, math.ceil(_cost(price, gpu_ns, tokens_in, tokens_out)))
        return Estimate(amount, tokens_in, tokens_out, source, base, per_token)

    def affordable_tokens(self, est: Estimate, budget: int) -> int:
        """How many output tokens ``budget`` units pay for under this estimate's line."""
        if est.per_token <= 0:
            return est.tokens_out
        return max(0, math.floor((budget - est.base) / est.per_token))

    # --- learning --------------------------------------------------------------------------
    def observe(
        self,
        model: str,
        *,
        tokens_in: int | None,
        tokens_out: int | None,
        prompt_ns: int | None,
        eval_ns: int | None,
        billed_ns: int | None = None,
    ) -> None:
        """Learn from one completed request whose upstream reported its own timings
        (``billed_ns``: the GPU time actually billed, which may include load time)."""
        if not self.learn or tokens_out is None:
            return
        rates = self._rates.get(model)
        pre = prompt_ns / tokens_in if prompt_ns is not None and tokens_in else None
        dec = eval_ns / tokens_out if eval_ns is not None and tokens_out else None
        with self._lock:
            if rates is None:
                if pre is None and dec is None:
                    return
                rates = self._rates[model] = ModelRates(pre or 0.0, dec or 0.0)
            else:
                if pre is not None:
                    rates.prefill_ns_per_token += ALPHA * (pre - rates.prefill_ns_per_token)
                if dec is not None:
                    if rates.decode_ns_per_token == 0.0:
                        rates.decode_ns_per_token = dec
                    rates.decode_ns_per_token += ALPHA * (dec - rates.decode_ns_per_token)
            if billed_ns is not None:
                extra = max(0.0, billed_ns - (prompt_ns or 0) - (eval_ns or 0))
                if rates.samples == 0:
                    rates.overhead_ns = extra
                rates.overhead_ns += ALPHA * (extra - rates.overhead_ns)
            rates.samples += 1
            rates.lengths.append(tokens_out)
            self._dirty.add(model)

    def rates(self, model: str) -> ModelRates | None:
        return self._rates.get(model)

    # --- persistence -----------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        db = _connect(path)
        try:
            rows = db.execute("SELECT * FROM model_rates")
            for model, pre, dec, overhead, samples, lengths, _ in rows:
                lens = deque((int(x) for x in lengths.split(",") if x), maxlen=LENGTH_WINDOW)
                self._rates[model] = ModelRates(pre, dec, overhead, samples, lens)
        finally:
            db.close()

    def flush(self) -> int:
        """Write changed rates to the ledger file (called periodically off the event loop)."""
        if self._db_path is None or not self._dirty:
            return 0
        with self._lock:
            rows = [
                (
                    m,
                    r.prefill_ns_per_token,
                    r.decode_ns_per_token,
                    r.overhead_ns,
                    r.samples,
                    ",".join(map(str, r.lengths)),
                    int(time.time() * 1000),
                )
                for m in self._dirty
                if (r := self._rates.get(m)) is not None
            ]
            self._dirty.clear()
        db = _connect(self._db_path)
        try:
            db.executemany("INSERT OR REPLACE INTO model_rates VALUES (?,?,?,?,?,?,?)", rows)
        finally:
            db.close()
        return len(rows)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    db.execute("PRAGMA busy_timeout=5000")
    db.execute(_SCHEMA)
    return db


def _cost(p: Price, gpu_ns: float, tokens_in: float, tokens_out: float) -> float:
    return (
        gpu_ns * p.per_gpu_second / NS_PER_S
        + tokens_in * p.per_input_token
        + tokens_out * p.per_output_token
    )
