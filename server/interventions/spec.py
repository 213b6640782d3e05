"""The request's `interventions` entries (DESIGN.md): a discriminated union on `type`.

The API and offline callers (benchmarks, calibration) parse entries with the same models, so a
bad entry is refused the same way everywhere.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

# Residual streams of Llama-family models have norms of tens to hundreds at middle layers (SmolLM2:
# median ~170 at layer 15); a steering value 100x beyond that only overflows half precision.
SteerValue = Annotated[float, Field(ge=-1e4, le=1e4)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SteerSpec(_Entry):
    """Add `strength * W_dec[feature]` (or `strength * vector`) to the residual stream after the
    SAE's (vector's) layer, or clamp an SAE latent to `clamp`."""

    type: Literal["steer"]
    sae: str | None = None
    feature: int | None = Field(None, ge=0)
    strength: SteerValue | None = None
    clamp: SteerValue | None = None
    vector: str | None = None
    positions: Literal["all", "generated"] = "all"

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.sae is None) == (self.vector is None):
            raise ValueError("a steer entry names exactly one of `sae` (with `feature`) or `vector`")
        if self.vector is not None:
            if self.strength is None or self.feature is not None or self.clamp is not None:
                raise ValueError("a vector steer entry takes `strength` (and no `feature` or `clamp`)")
        else:
            if self.feature is None:
                raise ValueError("an SAE steer entry needs `feature`")
            if (self.strength is None) == (self.clamp is None):
                raise ValueError("an SAE steer entry takes exactly one of `strength` (add) or `clamp`")
        return self


class EigenShiftSpec(_Entry):
    """Damp the output components a toxicity profile found: alpha 1 = no change, 0 = removed."""

    type: Literal["eigenshift"]
    profile: str
    alpha: float | None = Field(None, ge=0.0, le=1.0)  # None: the profile's calibrated default


class UnmemorizeSpec(_Entry):
    """Switch off, for this request, the down_proj neurons or weights a memorization profile found."""

    type: Literal["unmemorize"]
    profile: str


InterventionSpec = Annotated[Union[SteerSpec, EigenShiftSpec, UnmemorizeSpec], Field(discriminator="type")]
MAX_INTERVENTIONS = 32
# pydantic puts the discriminator's value into an error's location ("interventions.0.steer.feature");
# error messages leave it out so that every error names an entry as "interventions.0.feature"
ENTRY_TYPES = frozenset(m.model_fields["type"].annotation.__args__[0] for m in (SteerSpec, EigenShiftSpec, UnmemorizeSpec))


def entry_location(loc: tuple) -> list[str]:
    """A validation error's location with the discriminator tags left out."""
    return [str(part) for i, part in enumerate(loc)
            if not (part in ENTRY_TYPES and i > 0 and isinstance(loc[i - 1], int))]

_SPEC_LIST = TypeAdapter(list[InterventionSpec])


def parse_specs(entries: list) -> list[SteerSpec | EigenShiftSpec | UnmemorizeSpec]:
    """Dicts (or already-parsed models) -> models; raises pydantic.ValidationError."""
    return _SPEC_LIST.validate_python([e.model_dump() if isinstance(e, BaseModel) else e for e in entries])
