"""The generator: a profile embedding in, a tiny adapter's weights out, in one matrix product.

Output format: a rank-1 LoRA (default: every projection, PEFT init from one fixed seed, so every corpus adapter
starts from the same point and their weights are comparable coordinates). Each corpus adapter is flattened to
one vector ``theta`` (A then B per module, modules in name order). The generator is *reduced-rank ridge
regression* from the profile features ``x`` (:mod:`lorafleet.instant.embed`) to ``theta``::

    theta(x) = mean + V @ (W.T @ ((x - mu) / sigma))      V: (P, H) the corpus' top-H principal directions
                                                          W: (D, H) ridge map features -> their coefficients

Fitting is closed form (an eigendecomposition of the corpus' N x N Gram matrix and one D x D solve; the ridge
strength is picked on a validation slice of the corpus), so it takes seconds, and generation is two small
matrix-vector products plus one forward of the base over the profile (2.3 s measured on the loaded shared machine).

Storage: the generator is one linear map of rank ``H + 1``, ``theta = B @ A @ [x; 1]`` with
``A = [[W.T diag(1/sigma), -W.T (mu / sigma)], [0, 1]]`` and ``B = [V | mean]``. It is stored as a canonical lorafleet
blob holding that factor pair under the module name ``instant.generator`` (a module no base has, so the
blob can never be served or trained by mistake: every load onto a base refuses it), committed as an ordinary
registry revision (immutable, content-addressed, kept by gc, with aliases), its provenance carrying the base
fingerprint, the corpus digest (``dataset_digest``) and the layout of the adapters it writes (``hyperparams``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lorafleet.adapters import LoraAdapter, LoraSpec, decode_blob, to_bytes
from lorafleet.instant.embed import profile_features
from lorafleet.instant.errors import GeneratorMismatchError, InstantError, NoGeneratorError
from lorafleet.registry import Provenance
from lorafleet.registry.errors import NotFoundError

KIND = "instant-generator"
MODULE = "instant.generator"
GENERATOR_TENANT, GENERATOR_USER = "_instant", "generators"
MAX_COMPONENTS = 63  # the stored factor pair has rank H + 1 <= 64 (the blob format's largest rank)
DEFAULT_SPEC = LoraSpec(rank=1, alpha=16.0, target_modules="all")
INIT_SEED = 0  # every corpus adapter and every generated one start from LoraAdapter.create(..., seed=INIT_SEED)
# Ridge predictions are shrunk toward the corpus mean (the fit minimises squared error; most of an adapter's
# weights are per-user noise the profile cannot predict), and a weak adapter shows fewer habits. The generator
# scales its predicted departure from the mean by ``gain``. Measured by adherence on 24 corpus personas held out of
# the fit, never on the benchmark's held-out users (benchmarks/instant_tune.py -> docs/results/instant_tune.md):
# gain 1 gives 10-18% strict adherence, gains 1.5-2.5 give 25-36% (a plateau, within the noise of 96 prompts);
# 2.0 is its middle. 63 components (the most the blob holds) were best or tied at every gain.
DEFAULT_GAIN = 2.0
DEFAULT_COMPONENTS = 63


def default_generator_ref(base) -> str:
    """``_instant/generators/<base name>``: where :func:`commit_generator` puts a base's generator by default."""
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in base.name.lower()).strip("-.") or "base"
    return f"{GENERATOR_TENANT}/{GENERATOR_USER}/{name[:63]}"


def layout_of(adapter: LoraAdapter) -> list[list]:
    return [[name, list(A.shape), list(B.shape)] for name, (A, B) in sorted(adapter.weights.items())]


def flatten(adapter: LoraAdapter) -> Tensor:
    """One vector: A then B of each module, modules in name order."""
    return torch.cat([t.detach().float().reshape(-1) for _, (A, B) in sorted(adapter.weights.items()) for t in (A, B)])


def unflatten(theta: Tensor, layout: list[list], spec: LoraSpec, base_name: str | None = None) -> LoraAdapter:
    weights, at = {}, 0
    for name, a_shape, b_shape in layout:
        na, nb = math.prod(a_shape), math.prod(b_shape)
        A = theta[at: at + na].reshape(a_shape).clone()
        B = theta[at + na: at + na + nb].reshape(b_shape).clone()
        weights[name] = (A, B)
        at += na + nb
    if at != theta.numel():
        raise GeneratorMismatchError(f"the generator writes {theta.numel()} numbers but its layout holds {at}")
    return LoraAdapter(spec=spec, weights=weights, base_name=base_name)


@dataclass
class Generator:
    """A fitted generator (see the module docstring)."""

    spec: LoraSpec
    layout: list[list]
    mean: Tensor  # (P,)
    basis: Tensor  # (P, H)
    weight: Tensor  # (D, H): the ridge map with the feature standardization folded in
    offset: Tensor  # (H,)
    base_fingerprint: str
    corpus_digest: str
    info: dict = field(default_factory=dict)

    @property
    def components(self) -> int:
        return self.basis.shape[1]

    @property
    def feature_dim(self) -> int:
        return self.weight.shape[0]

    def predict(self, x: Tensor) -> Tensor:
        """``theta`` for features ``x`` (``(D,)`` or ``(N, D)``)."""
        z = x.float() @ self.weight + self.offset  # (..., H) coefficients on the principal directions
        return self.mean + z @ self.basis.T

    def adapter(self, x: Tensor, base_name: str | None = None) -> LoraAdapter:
        return unflatten(self.predict(x), self.layout, self.spec, base_name)

    def check_base(self, base) -> None:
        if base.fingerprint != self.base_fingerprint:
            raise GeneratorMismatchError(
                f"this generator was made for base {self.base_fingerprint[:16]}…, not the loaded base "
                f"{base.name!r} ({base.fingerprint[:16]}…); build a generator for this base")

    def generate(self, base, profile: str, examples: list[dict] | None = None) -> tuple[LoraAdapter, float]:
        """The adapter for a profile, and the seconds it took (embedding + generation)."""
        self.check_base(base)
        t0 = time.perf_counter()
        x = profile_features(base, profile, examples)
        if x.numel() != self.feature_dim:
            raise GeneratorMismatchError(f"profile features have {x.numel()} numbers; the generator takes "
                                         f"{self.feature_dim} (another base shape?)")
        adapter = self.adapter(x, base.name)
        seconds = time.perf_counter() - t0
        adapter.check_fits(base)
        return adapter, seconds

    # -- storage -------------------------------------------------------------------------------------
    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A: (H+1, D+1), B: (P, H+1))`` with ``theta(x) = B @ A @ [x; 1]``."""
        h, d = self.components, self.feature_dim
        A = torch.zeros(h + 1, d + 1)
        A[:h, :d] = self.weight.T
        A[:h, d] = self.offset
        A[h, d] = 1.0
        B = torch.cat([self.basis, self.mean[:, None]], dim=1)
        return A, B

    def to_blob(self) -> bytes:
        A, B = self.factors()
        rank = self.components + 1
        holder = LoraAdapter(spec=LoraSpec(rank=rank, alpha=float(rank), target_modules=("q_proj",)),
                             weights={MODULE: (A, B)})
        return to_bytes(holder)

    def hyperparams(self) -> dict:
        return {"kind": KIND, "output_spec": self.spec.to_dict(), "init_seed": INIT_SEED, "layout": self.layout,
                "features": self.feature_dim, "components": self.components, **self.info}

    def provenance(self) -> Provenance:
        return Provenance(base_fingerprint=self.base_fingerprint, method=KIND, hyperparams=self.hyperparams(),
                          dataset_digest=self.corpus_digest, example_count=self.info.get("personas"))

    @classmethod
    def from_blob(cls, blob: bytes, provenance: Provenance) -> Generator:
        hp = provenance.hyperparams or {}
        if hp.get("kind") != KIND:
            raise InstantError(f"this revision is not a generator (method {provenance.method!r})")
        holder = decode_blob(blob)
        if not isinstance(holder, LoraAdapter) or set(holder.weights) != {MODULE}:
            raise InstantError("the generator blob does not hold one 'instant.generator' factor pair")
        A, B = holder.weights[MODULE]
        h, d = A.shape[0] - 1, A.shape[1] - 1
        if d != hp.get("features") or h != hp.get("components") or B.shape[1] != h + 1:
            raise InstantError("the generator blob's shapes do not match its recorded features/components")
        spec_d = dict(hp["output_spec"])
        spec = LoraSpec(rank=spec_d["rank"], alpha=spec_d["alpha"], dropout=spec_d.get("dropout", 0.0),
                        target_modules=tuple(spec_d["target_modules"]))
        gen = cls(spec=spec, layout=hp["layout"], mean=B[:, h].clone(), basis=B[:, :h].clone(), weight=A[:h, :d].T.clone(),
                  offset=A[:h, d].clone(), base_fingerprint=provenance.base_fingerprint,
                  corpus_digest=provenance.dataset_digest or "",
                  info={k: v for k, v in hp.items() if k not in ("kind", "output_spec", "init_seed", "layout",
                                                                   "features", "components")})
        return gen


def fit_generator(features: Tensor, thetas: Tensor, *, spec: LoraSpec, layout: list[list], base_fingerprint: str,
                  corpus_digest: str, components: int = DEFAULT_COMPONENTS, gain: float = 1.0, lambdas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0),
                  val_fraction: float = 0.2, seed: int = 0, info: dict | None = None,
                  groups: Tensor | None = None) -> Generator:
    """Reduced-rank ridge from ``features (N, D)`` to ``thetas (N, P)``; the ridge strength (relative to the
    mean feature variance) is picked on a held-out slice of the rows, then the generator is refit on all rows.

    ``groups`` (N,): rows of one group (one persona's two profiles, which share their target) fall on the same
    side of the validation split, so the pick is judged on personas the fit has not seen. ``gain`` scales the
    predicted departure from the corpus mean (see :data:`DEFAULT_GAIN`); the validation error is of the ridge fit
    (gain 1)."""
    if not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
        raise InstantError(f"gain must be a positive number, got {gain!r}")
    n = features.shape[0]
    if n < 3 or thetas.shape[0] != n:
        raise InstantError(f"a generator needs at least 3 (profile, adapter) pairs; got {n} features, "
                           f"{thetas.shape[0]} adapters")
    g = torch.Generator().manual_seed(seed)
    groups = torch.arange(n) if groups is None else torch.as_tensor(groups)
    if groups.shape != (n,):
        raise InstantError(f"groups must give one group per row ({n}), got shape {tuple(groups.shape)}")
    ids = torch.unique(groups)
    if len(ids) < 3:
        raise InstantError(f"a generator needs at least 3 distinct personas; got {len(ids)}")
    chosen = ids[torch.randperm(len(ids), generator=g)[: max(1, int(round(len(ids) * val_fraction)))]]
    in_val = torch.isin(groups, chosen)
    val, tr = torch.nonzero(in_val).squeeze(1), torch.nonzero(~in_val).squeeze(1)

    def fit(rows: Tensor, lam: float) -> tuple:
        X, T = features[rows].double(), thetas[rows].double()
        mu, sigma = X.mean(0), X.std(0).clamp(min=1e-6) if len(rows) > 1 else torch.ones(X.shape[1])
        Xs = (X - mu) / sigma
        mean = T.mean(0)
        Tc = T - mean
        gram = Tc @ Tc.T  # (n, n): principal directions of the adapters without a P x P matrix
        evals, evecs = torch.linalg.eigh(gram)
        order = torch.argsort(evals, descending=True)
        h = max(1, min(components, MAX_COMPONENTS, len(rows) - 1, int((evals > 1e-10 * evals.max()).sum())))
        top = order[:h]
        s = evals[top].clamp(min=1e-12).sqrt()
        V = Tc.T @ evecs[:, top] / s  # (P, h) orthonormal
        C = Tc @ V  # (n, h) coefficients
        d = Xs.shape[1]
        W = torch.linalg.solve(Xs.T @ Xs + lam * len(rows) * torch.eye(d, dtype=Xs.dtype), Xs.T @ C)  # (d, h)
        return mean, V, W, mu, sigma

    scores = {}
    for lam in lambdas:
        mean, V, W, mu, sigma = fit(tr, lam)
        pred = mean + (((features[val].double() - mu) / sigma) @ W) @ V.T
        err = (pred - thetas[val].double()).pow(2).sum(1).mean()
        base_err = (mean - thetas[val].double()).pow(2).sum(1).mean()
        scores[lam] = float(err / base_err.clamp(min=1e-30))
    best = min(scores, key=scores.get)
    mean, V, W, mu, sigma = fit(torch.arange(n), best)
    meta = {**(info or {}), "personas_rows": n, "lambda": best, "gain": float(gain),
            "val_relative_error": {str(k): round(v, 4) for k, v in scores.items()}}
    # standardization and gain folded in: z = gain * ((x - mu) / sigma) @ W = x @ weight + offset
    weight = gain * W / sigma[:, None]
    return Generator(spec=spec, layout=layout, mean=mean.float(), basis=V.float(), weight=weight.float(),
                     offset=(-(mu @ weight)).float(), base_fingerprint=base_fingerprint, corpus_digest=corpus_digest, info=meta)


# -- the registry ------------------------------------------------------------------------------------
def commit_generator(registry, generator: Generator, ref: str, *, creator: str = "instant", alias: str = "live"):
    """Commit the generator as the next revision of ``ref`` and point ``alias`` at it; returns the revision."""
    rev = registry.commit(ref, generator.to_blob(), generator.provenance(), creator=creator, aliases=("candidate",))
    registry.set_alias(ref, alias, rev.number, actor=creator, reason="generator fitted")
    return registry.resolve(f"{ref}#{rev.number}")


def load_generator(registry, base, address: str | None = None) -> tuple[Generator, object]:
    """The generator at ``address`` (default: the base's default ref, ``live``) checked against ``base``;
    returns ``(generator, revision)``."""
    address = address or default_generator_ref(base)
    try:
        rev = registry.resolve(address)
    except NotFoundError as exc:
        raise NoGeneratorError(f"no generator at {address!r} ({exc}); fit one first "
                               "(python benchmarks/instant.py, or lorafleet.instant.build_generator)") from None
    if (rev.provenance.hyperparams or {}).get("kind") != KIND:
        raise InstantError(f"{rev.address} is not a generator (method {rev.provenance.method!r})")
    if rev.provenance.base_fingerprint != base.fingerprint:
        raise GeneratorMismatchError(
            f"generator {rev.address} was made for base {rev.provenance.base_fingerprint[:16]}…, not the loaded "
            f"base {base.name!r} ({base.fingerprint[:16]}…); use a generator built for this base")
    gen = Generator.from_blob(registry.read_blob(rev.digest), rev.provenance)
    return gen, rev
