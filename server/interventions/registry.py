"""The interventions a server has loaded, and how a request's entries resolve against them.

`InterventionRegistry.load` reads every profile found in the profile directories that was made
for the served model: SAEs (`sae-*/cfg.json`, SAELens layout), steering vectors
(`vector-*.safetensors`), EigenShift profiles (`eigenshift-*.safetensors`) and memorization
profiles (`memorization-*.safetensors`). One made for another model is refused with a logged
reason (and listed under `refused` in GET /v1/interventions). `resolve` turns a request's entries
into a `RowInterventions`, or raises InterventionError naming the entry and what is wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.interventions.eigenshift import METHOD as EIGENSHIFT
from server.interventions.eigenshift import EigenShiftProfile
from server.interventions.memorization import METHOD as MEMORIZATION
from server.interventions.memorization import MemorizationProfile
from server.interventions.plan import (
    LatentClamp,
    PreparedMemorization,
    PreparedSubspace,
    ResidualAdd,
    RowInterventions,
)
from server.interventions.sae import CONFIG_FILE, SaeFormatError, SparseAutoencoder
from server.interventions.sae import check_model as check_sae
from server.interventions.spec import (
    MAX_INTERVENTIONS,
    EigenShiftSpec,
    SteerSpec,
    UnmemorizeSpec,
    entry_location,
    parse_specs,
)
from server.interventions.vectors import METHOD as VECTOR
from server.interventions.vectors import SteeringVector, load_control_vector_gguf
from server.model.llama import LlamaDecoder
from server.profiles import (
    OtherModelProfileError,
    ProfileError,
    find_profiles,
    load_profile,
)

logger = logging.getLogger(__name__)


class InterventionError(ValueError):
    """A request entry that cannot be applied; `param` names it (e.g. "interventions.1.feature", as pydantic names fields)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class InterventionRegistry:
    model: LlamaDecoder
    fingerprint: str = ""
    model_name: str = ""
    saes: dict[str, SparseAutoencoder] = field(default_factory=dict)
    vectors: dict[str, SteeringVector] = field(default_factory=dict)
    eigenshift: dict[str, EigenShiftProfile] = field(default_factory=dict)
    memorization: dict[str, tuple[MemorizationProfile, PreparedMemorization]] = field(default_factory=dict)
    refused: list[dict[str, str]] = field(default_factory=list)

    # ---- loading ------------------------------------------------------------------------

    def add_sae(self, sae: SparseAutoencoder) -> None:
        check_sae(sae, self.model.config.hidden_size, self.fingerprint, self.model.config.num_layers)
        self.saes[sae.name] = sae.to(self.model.device)
        product = self.model.kernel_product(sae.W_enc.t())  # x @ W_enc
        if product is not None:
            sae.use_encoder_product(product)

    def add_vector(self, vector: SteeringVector) -> None:
        vector.check_model(self.model.config.hidden_size, self.model.config.num_layers)
        self.vectors[vector.name] = vector.to(self.model.device)

    def add_eigenshift(self, profile: EigenShiftProfile) -> None:
        profile.check_model(self.model.head.weight.shape[0], self.model.config.hidden_size)
        self.eigenshift[profile.name] = profile.to(self.model.device)

    def add_memorization(self, profile: MemorizationProfile) -> None:
        c = self.model.config
        profile.check_model(c.num_layers, c.intermediate_size)
        device = self.model.device
        keep = [None if (m := profile.keep_mask(i)) is None else m.to(device) for i in range(c.num_layers)]
        pruned = [profile.pruned_weights(i, layer.mlp.down.weight) for i, layer in enumerate(self.model.layers)]
        projections = []
        for i, layer in enumerate(self.model.layers):
            projection = profile.projection(i)
            if projection is None:
                projections.append(None)
                continue
            basis, offset = (t.to(device).contiguous() for t in projection)
            projections.append(PreparedSubspace(basis, basis.T.contiguous(), offset,
                                                layer.mlp.down.weight.float() @ basis))
        self.memorization[profile.name] = (profile, PreparedMemorization(profile.name, keep, pruned, projections))

    def load(self, directories: list[Path]) -> None:
        """Every profile in `directories` made for this model; others are refused with a reason."""
        for directory in directories:
            if not directory.is_dir():
                continue
            for cfg in sorted(directory.glob(f"**/sae-*/{CONFIG_FILE}")):
                self._try(cfg.parent, lambda p=cfg.parent: self.add_sae(SparseAutoencoder.load(p)))
            # llama.cpp control vectors as users have them; a GGUF vector records no model
            # fingerprint, so only its width and layers are checked.
            for path in sorted(directory.glob("**/vector-*.gguf")):
                self._try(path, lambda p=path: self.add_vector(
                    load_control_vector_gguf(p, p.stem.removeprefix("vector-"))))
        loaders = {VECTOR: (SteeringVector, self.add_vector), EIGENSHIFT: (EigenShiftProfile, self.add_eigenshift),
                   MEMORIZATION: (MemorizationProfile, self.add_memorization)}
        for method, (kind, add) in loaders.items():
            for path in find_profiles(directories, method):
                self._try(path, lambda p=path, k=kind, a=add: self._add_profile(p, k, a))

    def _add_profile(self, path: Path, kind, add) -> None:
        profile = load_profile(path)
        profile.check_model(self.fingerprint, self.model_name)
        add(kind.from_profile(profile))

    def _try(self, path: Path, load) -> None:
        try:
            load()
            logger.info("loaded intervention profile %s", path)
        except (ProfileError, SaeFormatError) as error:
            # Another model's profiles in their own directory are expected (one directory per
            # model under the cache): listed in `refused`, logged without a warning.
            expected = isinstance(error, OtherModelProfileError) and error.in_own_model_directory(path)
            logger.log(logging.INFO if expected else logging.WARNING, "not loading %s: %s", path, error)
            self.refused.append({"path": str(path), "reason": str(error)})

    def describe(self) -> dict[str, Any]:
        return {
            "sae": [sae.describe() for sae in self.saes.values()],
            "vector": [v.describe() for v in self.vectors.values()],
            "eigenshift": [p.describe() for p in self.eigenshift.values()],
            "unmemorize": [p.describe() for p, _ in self.memorization.values()],
            "refused": list(self.refused),
        }

    # ---- requests -----------------------------------------------------------------------

    def resolve(self, entries: list | None, param: str = "interventions") -> RowInterventions | None:
        """A request's entries (dicts or parsed specs) -> RowInterventions, None for none."""
        if not entries:
            return None
        if len(entries) > MAX_INTERVENTIONS:
            raise InterventionError(f"at most {MAX_INTERVENTIONS} interventions per request, got {len(entries)}", param)
        try:
            specs = parse_specs(entries)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(entry_location(first["loc"]))
            raise InterventionError(f"{param}.{where}: {first['msg']}", f"{param}.{where}") from None
        adds, clamps, eigen, unmem, applied = [], [], [], [], []
        seen_profiles: set[tuple[str, str]] = set()
        for i, spec in enumerate(specs):
            at = f"{param}.{i}"
            if isinstance(spec, SteerSpec):
                generated_only = spec.positions == "generated"
                if spec.vector is not None:
                    vector = self._named(self.vectors, spec.vector, "steering vector", f"{at}.vector")
                    for layer, direction in zip(vector.layers, vector.directions):
                        adds.append(ResidualAdd(layer, direction * spec.strength, generated_only))
                    applied.append({**spec.model_dump(exclude_none=True), "layers": list(vector.layers)})
                    continue
                sae = self._named(self.saes, spec.sae, "SAE", f"{at}.sae")
                if spec.feature >= sae.cfg.d_sae:
                    raise InterventionError(f"{at}.feature: SAE {spec.sae!r} has {sae.cfg.d_sae} features "
                                            f"(0..{sae.cfg.d_sae - 1}), not {spec.feature}", f"{at}.feature")
                if spec.clamp is not None:
                    clamps.append(LatentClamp(sae, spec.feature, spec.clamp, generated_only))
                else:
                    adds.append(ResidualAdd(sae.layer, sae.W_dec[spec.feature] * spec.strength, generated_only))
                applied.append({**spec.model_dump(exclude_none=True), "layer": sae.layer})
            elif isinstance(spec, EigenShiftSpec):
                profile = self._named(self.eigenshift, spec.profile, "EigenShift profile", f"{at}.profile")
                self._once(seen_profiles, ("eigenshift", spec.profile), at)
                alpha = profile.default_alpha if spec.alpha is None else spec.alpha
                eigen.append((profile, alpha))
                applied.append({"type": "eigenshift", "profile": spec.profile, "alpha": alpha})
            else:
                assert isinstance(spec, UnmemorizeSpec)
                _, prepared = self._named(self.memorization, spec.profile, "memorization profile", f"{at}.profile")
                self._once(seen_profiles, ("unmemorize", spec.profile), at)
                unmem.append(prepared)
                applied.append({"type": "unmemorize", "profile": spec.profile})
        return RowInterventions(tuple(adds), tuple(clamps), tuple(eigen), tuple(unmem), tuple(applied))

    @staticmethod
    def _named(table: dict, name: str, kind: str, param: str):
        if name not in table:
            loaded = ", ".join(sorted(table)) or "none"
            raise InterventionError(f"{param}: no {kind} named {name!r} is loaded (loaded: {loaded}; "
                                    "GET /v1/interventions lists them)", param)
        return table[name]

    @staticmethod
    def _once(seen: set, key: tuple[str, str], at: str) -> None:
        if key in seen:
            raise InterventionError(f"{at}: {key[0]} profile {key[1]!r} is named twice", at)
        seen.add(key)
