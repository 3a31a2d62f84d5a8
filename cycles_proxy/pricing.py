"""Price table, estimates and actual cost, all in integer ledger units.

GPU time is carried as integer nanoseconds; a cost is rounded up to the next whole unit once, so
a request that used the GPU never costs zero and no float touches an amount.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from cycles_proxy.authority.base import Unit
from cycles_proxy.settings import PriceRule, Settings

NS_PER_S = 1_000_000_000
#: output length assumed for estimates when the caller sets no cap and nothing was learned
DEFAULT_OUTPUT_TOKENS = 512
#: characters per token for estimating prompt size before the upstream counts it
CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Price:
    per_gpu_second: int
    per_input_token: int
    per_output_token: int


class Pricing:
    def __init__(self, settings: Settings) -> None:
        self.unit = settings.unit
        self._rules = list(settings.prices)
        default_gpu = settings.default_price_per_gpu_second
        if self.unit == Unit.TOKENS:
            # a TOKENS budget counts tokens: one unit per token, GPU time free
            self._default = Price(0, 1, 1)
        else:
            self._default = Price(default_gpu, 0, 0)
        self._cache: dict[str, Price] = {}

    def price(self, model: str) -> Price:
        hit = self._cache.get(model)
        if hit is not None:
            return hit
        price = self._default
        for rule in self._rules:
            if rule.model == model or fnmatch.fnmatchcase(model, rule.model):
                price = _from_rule(rule)
                break
        if len(self._cache) < 4096:  # bounded: model names come from callers
            self._cache[model] = price
        return price

    def actual(self, model: str, gpu_ns: int, tokens_in: int | None, tokens_out: int | None) -> int:
        return self.cost(self.price(model), gpu_ns, tokens_in or 0, tokens_out or 0)

    @staticmethod
    def cost(p: Price, gpu_ns: int, tokens_in: int, tokens_out: int) -> int:
        gpu = -(-max(0, gpu_ns) * p.per_gpu_second // NS_PER_S)  # ceil, integers only
        return gpu + tokens_in * p.per_input_token + tokens_out * p.per_output_token


def _from_rule(rule: PriceRule) -> Price:
    return Price(rule.per_gpu_second, rule.per_input_token, rule.per_output_token)
