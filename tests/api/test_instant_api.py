"""The management API's generated first revision (POST /v1/adapters with from_profile) on the tiny base."""

from lorafleet.instant import commit_generator, default_generator_ref
from lorafleet.testing.instant import synthetic_generator


def test_create_from_profile_over_http(server, admin_client):
    commit_generator(server.registry, synthetic_generator(server.base), default_generator_ref(server.base))
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
    commit_generator(server.registry, synthetic_generator(server.base), default_generator_ref(server.base))
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
