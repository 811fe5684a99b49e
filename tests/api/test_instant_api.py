"""The management API's generated first revision (POST /v1/adapters with from_profile) on the tiny base."""

import torch

from lorafleet.adapters import LoraAdapter
from lorafleet.instant import DEFAULT_SPEC, commit_generator, default_generator_ref, fit_generator, split_family
from lorafleet.instant.embed import profile_features_many
from lorafleet.instant.generator import INIT_SEED, flatten, layout_of


def _generator(base):
    """Fitted on real profile features and synthetic adapters around the shared init (no training)."""
    personas, _ = split_family(8, 0, seed=2)
    feats = profile_features_many(base, [(p.describe(), None) for p in personas]
                                  + [(p.describe(), p.data(2, 1)[0]) for p in personas])
    init_adapter = LoraAdapter.create(base, DEFAULT_SPEC, seed=INIT_SEED)
    init = flatten(init_adapter)
    mix = torch.randn(feats.shape[1], init.numel(), generator=torch.Generator().manual_seed(0)) * 1e-4
    return fit_generator(feats, init + (feats - feats.mean(0)) @ mix, spec=DEFAULT_SPEC, layout=layout_of(init_adapter),
                         base_fingerprint=base.fingerprint, corpus_digest="1" * 64, components=4)


def test_create_from_profile_over_http(server, admin_client):
    commit_generator(server.registry, _generator(server.base), default_generator_ref(server.base))
    r = admin_client.post("/v1/adapters", json={"ref": "acme/gen/style", "from_profile": "writes in all lowercase"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["revision"]["number"] == 1 and body["revision"]["provenance"]["method"] == "generated"
    assert body["generation_seconds"] > 0 and body["generator"].endswith("#1")
    assert body["revision"]["aliases"] == ["candidate"]
    # the generated revision is served like any other (by address)
    chat = admin_client.post("/v1/chat/completions", json={"model": "acme/gen/style@candidate", "max_tokens": 3,
                                                           "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text


def test_bad_profiles_over_http_commit_nothing(server, admin_client):
    commit_generator(server.registry, _generator(server.base), default_generator_ref(server.base))
    cases = [
        ({"from_profile": ""}, 422, "profile is empty"),
        ({"from_profile": "x", "examples": [{"messages": [{"role": "assistant", "content": "a"}]}] * 9}, 422,
         "at most 8"),
        ({"from_profile": "x", "generator": "acme/alice/style"}, 422, "not a generator"),
        ({"from_profile": "x", "generator": "acme/nobody/style"}, 404, "no generator"),
        ({"examples": []}, 422, "go with from_profile"),
    ]
    for extra, status, match in cases:
        r = admin_client.post("/v1/adapters", json={"ref": "acme/bad/style", **extra})
        assert r.status_code == status, (extra, r.text)
        assert match in r.text
    assert admin_client.get("/v1/adapters/acme/bad/style").status_code == 404
