"""Instant personal models: a user's first adapter generated from their profile, then refined by training.

- :mod:`~lorafleet.instant.family`: a compositional persona family (corpus and held-out users);
- :mod:`~lorafleet.instant.embed`: the profile embedding (the base's own mean-pooled hidden states);
- :mod:`~lorafleet.instant.corpus`: (profile, trained adapter) pairs from the packed trainer, cached on disk;
- :mod:`~lorafleet.instant.generator`: reduced-rank ridge from the embedding to rank-1 LoRA weights, stored as a
  registry revision with provenance (base fingerprint, corpus digest);
- :mod:`~lorafleet.instant.create`: the product path, a generated revision #1 (``method=generated``).

See docs/instant.md.
"""

from lorafleet.instant.corpus import Corpus, CorpusConfig, build_corpus, train_many
from lorafleet.instant.create import Generated, create_from_profile, read_examples
from lorafleet.instant.embed import MAX_EXAMPLES, check_profile
from lorafleet.instant.errors import GeneratorMismatchError, InstantError, NoGeneratorError
from lorafleet.instant.family import ComboPersona, split_family
from lorafleet.instant.generator import (
    DEFAULT_COMPONENTS,
    DEFAULT_GAIN,
    DEFAULT_SPEC,
    Generator,
    commit_generator,
    default_generator_ref,
    fit_generator,
    load_generator,
)

__all__ = [
    "Corpus", "CorpusConfig", "ComboPersona", "DEFAULT_COMPONENTS", "DEFAULT_GAIN", "DEFAULT_SPEC", "Generated", "Generator", "GeneratorMismatchError",
    "InstantError", "MAX_EXAMPLES", "NoGeneratorError", "check_profile", "build_corpus", "build_generator", "commit_generator", "create_from_profile",
    "default_generator_ref", "fit_generator", "load_generator", "read_examples", "split_family", "train_many",
]


def build_generator(base, corpus: Corpus, config: CorpusConfig, *, components: int = DEFAULT_COMPONENTS,
                    gain: float = DEFAULT_GAIN) -> Generator:
    """Fit a generator on a built corpus (both feature rows of every persona; the validation split keeps a
    persona's two rows together)."""
    x, t, groups = corpus.rows()
    return fit_generator(x, t, spec=config.spec, layout=corpus.layout, base_fingerprint=base.fingerprint,
                         corpus_digest=corpus.digest, components=components, gain=gain, groups=groups,
                         info={"personas": len(corpus.personas), "corpus": config.to_dict()})
