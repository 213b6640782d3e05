"""What the API hands the engine, and what the engine streams back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.interventions.plan import RowInterventions


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top-N alternatives per generated token; 0 = the chosen one only
    prompt_logprobs: int | None = None  # same, for every prompt token after the first
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    sparsity: float = 0.0  # WINA target for this row, 0 = dense
    interventions: "RowInterventions | None" = None  # resolved by the registry; None = none


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the N most likely (token id, logprob), best first


@dataclass
class StepOutput:
    """Everything new for one sequence since its previous output."""

    request_id: str
    text: str  # text released by this step (held back while it could still become a stop string)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only
    error: str | None = None
    error_status: int = 500  # the HTTP status an error maps to: 400 when the request itself caused it
    sparsity_achieved: float | None = None  # on the finishing output: share of weights skipped
    extra: dict = field(default_factory=dict)
