"""The unmodified official ``tinker`` SDK (0.38.0) against a lorafleet server on loopback (tiny base).

The SFT loop as the Tinker docs write it — datums with target tokens and weights, forward_backward with
cross_entropy, optim_step(AdamParams), save_weights_for_sampler, sample — then the revision it left in the
registry, served through /v1/chat/completions. Plus packing across clients, save/load state, listings and
bad inputs (each answered with an error that names the problem).
"""

from __future__ import annotations

import numpy as np
import openai
import pytest
import tinker
import torch
from tinker import types

from lorafleet.api.tinker.scheduler import Op
from lorafleet.serving.params import SamplingParams

TEXTS = ["the cat sat on the mat", "hello world, hello lorafleet", "one two three four five six",
         "a personal model per user", "every revision has provenance", "small adapters, one base"]


def sdk(server, who: str = "acme") -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.url, api_key="tml-" + server.keys[who])


def datum(tok, text: str) -> types.Datum:
    ids = tok.encode(text)
    weights = [0.0] + [1.0] * (len(ids) - 2)  # the first target is a prompt token: not learned
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": weights})


def mean_nll(result: types.ForwardBackwardOutput, data: list[types.Datum]) -> float:
    """The SDK-side mean token loss: -sum(logprobs * weights) / sum(weights) (as the Tinker cookbook does)."""
    num = den = 0.0
    for out, d in zip(result.loss_fn_outputs, data, strict=True):
        w = np.asarray(d.loss_fn_inputs["weights"].data)
        num -= float(np.dot(out["logprobs"].to_numpy(), w))
        den += float(w.sum())
    return num / den


def test_sft_loop_trains_samples_commits_and_serves(server, tk):
    sc = sdk(server)
    tc = sc.create_lora_training_client(base_model=server.base.name, rank=4, seed=0,
                                        user_metadata={"lorafleet_adapter": "alice/tinker-sft"}).result()
    assert tc.get_info().model_data.model_name == server.base.name
    data = [datum(server.base.tokenizer, t) for t in TEXTS]
    curve = []
    for _ in range(10):
        fb = tc.forward_backward(data, "cross_entropy")
        step = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        result = fb.result()
        step.result()
        curve.append(mean_nll(result, data))
        assert result.metrics["loss:sum"] == pytest.approx(curve[-1] * sum(
            float(np.sum(d.loss_fn_inputs["weights"].data)) for d in data), rel=1e-4)
    assert curve[-1] < curve[0] - 0.3 and np.mean(curve[5:]) < np.mean(curve[:5]), curve  # the loss goes down

    path = tc.save_weights_for_sampler("sft-1").result().path
    assert path == f"tinker://{tc.model_id}/sampler_weights/sft-1"
    sampler = sc.create_sampling_client(model_path=path).result()
    prompt = types.ModelInput.from_ints(server.base.tokenizer.encode("the cat"))
    out = sampler.sample(prompt, num_samples=3,
                         sampling_params=types.SamplingParams(max_tokens=6, temperature=0.8, seed=7)).result()
    assert len(out.sequences) == 3 and all(1 <= len(s.tokens) <= 6 for s in out.sequences)
    assert all(s.stop_reason in ("length", "stop") for s in out.sequences)
    greedy = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0)).result().sequences[0]
    # Sampled tokens come with their log-probs under the checkpoint: equal to a forward pass of the trainer.
    full = prompt.to_ints() + list(greedy.tokens)
    check = types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                        loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)})
    fwd = tc.forward([check], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(greedy.logprobs, fwd[len(prompt.to_ints()) - 1:], atol=1e-4)

    # The checkpoint is revision 1 of acme/alice/tinker-sft, with its provenance.
    rev = server.registry.resolve("acme/alice/tinker-sft#1")
    prov = rev.provenance
    assert prov.method == "tinker" and prov.base_fingerprint == server.base.fingerprint
    assert prov.hyperparams["loss"] == ["cross_entropy"] and prov.hyperparams["steps"] == 10
    assert prov.hyperparams["tinker_path"] == path and prov.example_count == 10 * len(TEXTS)
    assert "candidate" in rev.aliases

    # ...served through the OpenAI API like any other revision: same tokens as the engine with that digest.
    msgs = [{"role": "user", "content": "the cat"}]
    chat = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0)
    answer = chat.chat.completions.create(model="acme/alice/tinker-sft#1", messages=msgs, max_tokens=6, temperature=0)
    direct = server.engine.generate([msgs], [rev.digest], SamplingParams(max_tokens=6))[0].text
    assert answer.choices[0].message.content == direct
    # ...and the Tinker sampler ran the same adapter: greedy tokens equal the engine's on the same prompt.
    same = server.engine.generate([server.base.tokenizer.encode("the cat")], [rev.digest],
                                  SamplingParams(max_tokens=6))[0]
    assert list(greedy.tokens) == same.token_ids

    # A second save is revision 2, parented on 1; the listings show the run and both checkpoints.
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    tc.save_weights_for_sampler("sft-2").result()
    rev2 = server.registry.resolve("acme/alice/tinker-sft#2")
    assert rev2.provenance.parent == 1 and rev2.provenance.hyperparams["steps"] == 11
    rest = tinker.RestClient(base_url=server.url, api_key="tml-" + server.keys["acme"])
    runs = rest.list_training_runs().result().training_runs
    assert tc.model_id in [r.training_run_id for r in runs]
    ckpts = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert [c.checkpoint_id for c in ckpts] == ["sampler_weights/sft-1", "sampler_weights/sft-2"]


def test_stop_strings_and_stop_tokens(server, tk):
    sc = sdk(server)
    sampler = sc.create_sampling_client(base_model=server.base.name).result()
    tok = server.base.tokenizer
    prompt = types.ModelInput.from_ints(tok.encode("hello"))
    free = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=12, temperature=0.0)).result().sequences[0]
    stop_id = int(free.tokens[3])
    cut = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=12, temperature=0.0, stop=[stop_id])).result()
    seq = cut.sequences[0]
    assert list(seq.tokens) == list(free.tokens[: free.tokens.index(stop_id) + 1]) and seq.stop_reason == "stop"


def test_clients_share_one_packed_pass_with_the_same_result(server, tk):
    """Two tenants' forward_backward requests in one pass give each the result it gets alone."""
    acme, globex = sdk(server, "acme"), sdk(server, "globex")
    runs = [c.create_lora_training_client(base_model=server.base.name, rank=r, seed=s).result()
            for c, r, s in ((acme, 4, 1), (globex, 8, 2))]
    data = [[datum(server.base.tokenizer, t) for t in TEXTS[:3]], [datum(server.base.tokenizer, t) for t in TEXTS[3:]]]
    for tc, d in zip(runs, data, strict=True):  # one real step each, so the adapters differ from the base
        tc.forward_backward(d, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    alone = [tc.forward(d, "cross_entropy").result() for tc, d in zip(runs, data, strict=True)]

    def op(tc, d):
        decoded = [{"tokens": x.model_input.to_ints(),
                    "inputs": {k: np.asarray(v.data) for k, v in x.loss_fn_inputs.items()}} for x in d]
        return Op(run=tk.runs[tc.model_id], seq_id=None, kind="forward_backward",
                  payload={"loss_fn": "cross_entropy", "forward_only": True, "data": [
                      (x["tokens"], {"target_tokens": torch.tensor(x["inputs"]["target_tokens"]),
                                     "weights": torch.tensor(x["inputs"]["weights"], dtype=torch.float32)})
                      for x in decoded]})

    from tinker.proto.response_conv import deserialize_forward_backward_output

    packed = tk._forward_backward([op(tc, d) for tc, d in zip(runs, data, strict=True)])
    for a, p in zip(alone, packed, strict=True):
        p = deserialize_forward_backward_output(p)
        assert p.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)
        for x, y in zip(a.loss_fn_outputs, p.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), atol=1e-5)
    # Through HTTP, concurrent requests of both clients were packed at least once.
    futures = [tc.forward_backward(d, "cross_entropy") for tc, d in zip(runs, data, strict=True) for _ in range(3)]
    [f.result() for f in futures]
    assert tk.scheduler.packed_runs_max >= 2


def test_save_state_then_load_state_restores_weights_and_optimizer(server, tk):
    sc = sdk(server)
    tc = sc.create_lora_training_client(base_model=server.base.name, rank=4, seed=3).result()
    data = [datum(server.base.tokenizer, t) for t in TEXTS[:2]]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    saved = tc.save_state("ckpt-a").result().path
    at_save = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
    for _ in range(3):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] != pytest.approx(at_save, rel=1e-4)
    # The SDK's current way: a new training client from the checkpoint (weights + optimizer state).
    resumed = sc.create_training_client_from_state_with_optimizer(saved).result()
    assert resumed.model_id != tc.model_id
    assert resumed.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(at_save, rel=1e-5)
    assert tk.runs[resumed.model_id].steps == 1  # the optimizer's step count came back too
    # The deprecated in-place load_state still works.
    with pytest.warns(FutureWarning):
        tc.load_state(saved).result()
    assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(at_save, rel=1e-5)
    # Training checkpoints are files: found again by path after the run left memory (a server restart).
    tk.runs.pop(tc.model_id)
    again = sc.create_training_client_from_state(saved).result()
    assert again.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(at_save, rel=1e-5)
    with pytest.raises(Exception, match="does not exist"):
        sc.create_training_client_from_state(saved.replace("ckpt-a", "ckpt-zz")).result()


def test_bad_inputs_are_named(server, tk):
    sc = sdk(server)
    with pytest.raises(Exception, match=r"lora_config.rank must be an integer in 1\.\.16"):
        sc.create_lora_training_client(base_model=server.base.name, rank=99).result()
    with pytest.raises(Exception, match="is not served here"):
        sc.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=4).result()
    tc = sc.create_lora_training_client(base_model=server.base.name, rank=4).result()
    ids = server.base.tokenizer.encode("the cat sat")
    bad = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                      loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) + 2)})
    with pytest.raises(Exception, match=r"'weights'\] has \d+ entries but model_input has \d+ tokens"):
        tc.forward_backward([bad], "cross_entropy").result()
    good = datum(server.base.tokenizer, "the cat sat")
    with pytest.raises(Exception, match="loss_fn 'gspo' is not supported"):
        tc.forward_backward([good], "gspo").result()
    with pytest.raises(Exception, match="model_input is empty"):
        tc.forward_backward([types.Datum(model_input=types.ModelInput.from_ints([]),
                                         loss_fn_inputs={"target_tokens": [], "weights": []})], "cross_entropy").result()
    assert tk.runs[tc.model_id].datums == 0  # nothing was applied
    sampler = sc.create_sampling_client(base_model=server.base.name).result()
    with pytest.raises(Exception, match="top_k is not supported"):
        sampler.sample(types.ModelInput.from_ints(ids), 1, types.SamplingParams(max_tokens=4, top_k=5)).result()
    with pytest.raises(Exception, match=r"num_samples must be an integer in 1\.\.16"):
        sampler.sample(types.ModelInput.from_ints(ids), 17, types.SamplingParams(max_tokens=4)).result()

    # Wrong key: refused before anything is created.
    import httpx

    before = len(tk.runs)
    r = httpx.post(f"{server.url}/api/v1/create_session", headers={"X-API-Key": "tml-lf-acme-not-a-key"}, json={})
    assert r.status_code == 401 and "invalid or revoked API key" in r.json()["error"]["message"]
    with pytest.raises(Exception, match="invalid or revoked API key"):
        tinker.ServiceClient(base_url=server.url, api_key="tml-wrong-key-0123456789").create_lora_training_client(
            base_model=server.base.name, rank=4).result()
    assert len(tk.runs) == before
    # Another tenant's run looks absent.
    h = {"X-API-Key": "tml-" + server.keys["globex"]}
    r = httpx.post(f"{server.url}/api/v1/get_info", headers=h, json={"model_id": tc.model_id})
    assert r.status_code == 404 and tc.model_id in r.json()["error"]["message"]
    # An endpoint this server does not offer is named in the error.
    r = httpx.post(f"{server.url}/api/v1/create_custom_loss", headers=h, json={})
    assert r.status_code == 404
    assert "'POST /api/v1/create_custom_loss' is not supported" in r.json()["error"]["message"]


def test_importance_sampling_loss(server, tk):
    """importance_sampling: the loss is -(exp(logp - sampler_logp) * advantages).sum()."""
    sc = sdk(server)
    tc = sc.create_lora_training_client(base_model=server.base.name, rank=4, seed=5).result()
    ce = datum(server.base.tokenizer, TEXTS[0])
    logp = tc.forward([ce], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    adv = np.linspace(-1, 1, len(logp)).astype(np.float32)
    d = types.Datum(model_input=ce.model_input, loss_fn_inputs={
        "target_tokens": ce.loss_fn_inputs["target_tokens"], "logprobs": (logp - 0.1).tolist(), "advantages": adv})
    out = tc.forward_backward([d], "importance_sampling").result()
    assert out.metrics["loss:sum"] == pytest.approx(float(-(np.exp(0.1) * adv).sum()), abs=1e-4)


def test_ppo_cispo_dro_losses(server, tk):
    """ppo / cispo / dro through the SDK, with and without loss_fn_config: loss:sum is the Tinker docs' formula
    over the server's own log-probs, each trains the run (the log-probs move), and a bad config is a 400 naming it."""
    sc = sdk(server)
    tc = sc.create_lora_training_client(base_model=server.base.name, rank=4, seed=6).result()
    ce = datum(server.base.tokenizer, TEXTS[1])
    logp = tc.forward([ce], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy().astype(np.float64)
    delta = np.resize([-0.6, -0.1, 0.0, 0.1, 0.6], len(logp))  # log-ratios inside and outside the clip ranges
    adv = np.resize([1.0, -1.0, 0.5, -0.5], len(logp))
    q = logp - delta
    rl = types.Datum(model_input=ce.model_input, loss_fn_inputs={
        "target_tokens": ce.loss_fn_inputs["target_tokens"], "logprobs": q.astype(np.float32).tolist(),
        "advantages": adv.astype(np.float32).tolist()})
    r = np.exp(delta)
    cases = [("ppo", None, -np.minimum(r * adv, np.clip(r, 0.8, 1.2) * adv)),
             ("ppo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05},
              -np.minimum(r * adv, np.clip(r, 0.95, 1.05) * adv)),
             ("cispo", None, -np.clip(r, 0.0, 4.0) * logp * adv),
             ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, -np.clip(r, 0.9, 1.1) * logp * adv),
             ("dro", {"beta": 0.3}, -(logp * adv - 0.15 * delta ** 2))]
    for loss_fn, config, want in cases:
        out = tc.forward([rl], loss_fn, config).result()
        assert out.metrics["loss:sum"] == pytest.approx(float(want.sum()), abs=2e-4), (loss_fn, config)
        np.testing.assert_allclose(out.loss_fn_outputs[0]["elementwise_loss"].to_numpy(), want, atol=2e-5)
    for loss_fn, config, _ in cases:  # each one trains: a step moves the log-probs
        tc.forward_backward([rl], loss_fn, config).result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        after = tc.forward([ce], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        assert np.abs(after - logp).max() > 1e-4, loss_fn
        logp = after.astype(np.float64)
    assert tk.runs[tc.model_id].loss_configs["dro"] == {"beta": 0.3}
    datums = tk.runs[tc.model_id].datums
    with pytest.raises(Exception, match=r"loss_fn 'dro' needs loss_fn_config\['beta'\]"):
        tc.forward_backward([rl], "dro").result()
    with pytest.raises(Exception, match=r"loss_fn_config \['clip_ratio'\] not understood: loss_fn 'ppo' takes"):
        tc.forward_backward([rl], "ppo", {"clip_ratio": 0.2}).result()
    with pytest.raises(Exception, match="clip_low_threshold 2.0 is above clip_high_threshold 1.2"):
        tc.forward_backward([rl], "ppo", {"clip_low_threshold": 2.0}).result()
    with pytest.raises(Exception, match=r"loss_fn_config\['beta'\] must be a finite number >= 0, got 'big'"):
        tc.forward_backward([rl], "dro", {"beta": "big"}).result()
    with pytest.raises(Exception, match="is missing \\['logprobs', 'advantages'\\]"):
        tc.forward_backward([ce], "cispo").result()
    assert tk.runs[tc.model_id].datums == datums  # nothing was applied


def test_checkpoint_user_metadata_and_session_search(server, tk):
    """save_state / save_weights_for_sampler user_metadata is stored with the checkpoint (the sidecar, the revision's
    provenance) and listed; RestClient.search_sessions finds sessions by user_metadata, name and status."""
    import warnings

    import httpx

    tag = f"exp-{len(tk.sessions)}"
    sc = tinker.ServiceClient({"experiment": tag, "team": "rl"}, display_name=f"Nightly RL {tag}",
                              base_url=server.url, api_key="tml-" + server.keys["acme"])
    tc = sc.create_lora_training_client(base_model=server.base.name, rank=4, seed=2,
                                        user_metadata={"lorafleet_adapter": "alice/tinker-meta"}).result()
    data = [datum(server.base.tokenizer, TEXTS[2])]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler_path = tc.save_weights_for_sampler("m1", user_metadata={"reward": "0.75", "stage": "rl"}).result().path
    state_path = tc.save_state("s1", user_metadata={"stage": "resume-me"}).result().path
    rest = tinker.RestClient(base_url=server.url, api_key="tml-" + server.keys["acme"])
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    rev = server.registry.resolve("acme/alice/tinker-meta#1")
    assert listed[sampler_path].user_metadata == {"reward": "0.75", "stage": "rl",
                                                  "lorafleet_revision": "1", "lorafleet_digest": rev.digest}
    assert listed[state_path].user_metadata == {"stage": "resume-me"}
    assert rev.provenance.hyperparams["user_metadata"] == {"reward": "0.75", "stage": "rl"}  # in the registry
    # A training checkpoint's metadata lives in its sidecar: listed again after a restart (the run left memory).
    assert tk.find_checkpoint(server.service.keys.verify(server.keys["acme"]), state_path,
                              "training").user_metadata == {"stage": "resume-me"}
    # Reserved keys and wrong shapes are refused, and nothing is saved.
    with pytest.raises(Exception, match="the 'lorafleet_' prefix is reserved"):
        tc.save_weights_for_sampler("m2", user_metadata={"lorafleet_revision": "9"}).result()
    h = {"X-API-Key": "tml-" + server.keys["acme"]}
    r = httpx.post(f"{server.url}/api/v1/save_weights_for_sampler", headers=h,
                   json={"model_id": tc.model_id, "path": "m3", "user_metadata": {"reward": 5}})
    assert r.status_code == 400 and "user_metadata.reward" in r.json()["error"]["message"]
    assert [c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [
        "sampler_weights/m1", "weights/s1"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # search_sessions is marked experimental in the SDK
        page = rest.search_sessions(types.SessionSearchRequest(user_metadata={"experiment": tag})).result()
        assert [s.session_id for s in page.sessions] == [tk.runs[tc.model_id].session_id]
        hit = page.sessions[0]
        assert hit.user_metadata == {"experiment": tag, "team": "rl"} and hit.checkpoints_count == 2
        assert hit.display_name == f"Nightly RL {tag}" and hit.project_id == "acme" and hit.status.type == "active"
        by_name = rest.search_sessions(types.SessionSearchRequest(display_name=f"rl nightly {tag}")).result()
        assert [s.session_id for s in by_name.sessions] == [hit.session_id]
        assert not rest.search_sessions(types.SessionSearchRequest(
            user_metadata={"experiment": tag, "team": "sft"})).result().sessions  # every pair must hold
        # get_session / list_sessions / get_weights_info_by_tinker_path
        info = rest.get_session(hit.session_id).result()
        assert info.training_run_ids == [tc.model_id] and info.user_metadata == {"experiment": tag, "team": "rl"}
        assert info.display_name == f"Nightly RL {tag}"
        assert hit.session_id in rest.list_sessions(limit=1000).result().sessions
        for path in (sampler_path, state_path):
            w = rest.get_weights_info_by_tinker_path(path).result()
            assert (w.base_model, w.is_lora, w.lora_rank, w.train_attn, w.train_mlp) == (
                server.base.name, True, 4, True, True)
        # Another tenant's key does not see it, even when asking for every accessible owner.
        other = tinker.RestClient(base_url=server.url, api_key="tml-" + server.keys["globex"])
        assert not other.search_sessions(types.SessionSearchRequest(
            user_metadata={"experiment": tag}, owner=types.AccessibleSearchOwner())).result().sessions
        assert hit.session_id not in other.list_sessions(limit=1000).result().sessions
        with pytest.raises(Exception, match="does not exist"):
            other.get_session(hit.session_id).result()
        with pytest.raises(Exception, match="does not exist"):
            other.get_weights_info_by_tinker_path(sampler_path).result()
        with pytest.raises(Exception, match=r"project_ids \['acme'\] cannot be listed with this key"):
            other.search_sessions(types.SessionSearchRequest(project_ids=["acme"])).result()
        # Paging: newest first, next_cursor until exhausted.
        for _ in range(3):
            tinker.ServiceClient({"experiment": tag + "-page"}, base_url=server.url,
                                 api_key="tml-" + server.keys["acme"]).create_sampling_client(
                base_model=server.base.name).result()
        seen, req = [], types.SessionSearchRequest(user_metadata={"experiment": tag + "-page"}, limit=2)
        while True:
            page = rest.search_sessions(req).result()
            seen += [(s.created_at, s.session_id) for s in page.sessions]
            if page.next_cursor is None:
                break
            req = req.model_copy(update={"cursor": page.next_cursor})
        assert len(seen) == 3 and seen == sorted(seen, reverse=True)
        # A finished session matches a client_finished status query.
        sc.close("success").result()
        r = httpx.post(f"{server.url}/api/v1/create_model", headers=h, json={  # the server refuses it too
            "session_id": hit.session_id, "model_seq_id": 99, "base_model": server.base.name,
            "lora_config": {"rank": 4}})
        assert r.status_code == 400 and "has finished (success)" in r.json()["error"]["message"]
        done = rest.search_sessions(types.SessionSearchRequest(
            user_metadata={"experiment": tag}, statuses=[types.ClientFinishedSessionStatusQuery()])).result()
        assert [s.session_id for s in done.sessions] == [hit.session_id]


def test_forward_backward_custom_runs_client_side_over_cross_entropy(server, tk):
    """forward_backward_custom (the SDK's client-side path: a forward, then cross_entropy with the custom loss's
    gradient as weights) trains exactly like the built-in loss it reimplements."""
    sc = sdk(server)
    data = [datum(server.base.tokenizer, t) for t in TEXTS[:2]]
    builtin, custom = (sc.create_lora_training_client(base_model=server.base.name, rank=4, seed=9).result()
                       for _ in range(2))

    def nll(batch, logprobs_list):
        loss = sum(-(d.loss_fn_inputs["weights"].to_torch() * lp).sum() for d, lp in zip(batch, logprobs_list,
                                                                                         strict=True))
        return loss, {}

    builtin.forward_backward(data, "cross_entropy").result()
    custom.forward_backward_custom(data, nll).result()
    for tc in (builtin, custom):
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    a, b = (tc.forward(data, "cross_entropy").result() for tc in (builtin, custom))
    assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
    before = sc.create_lora_training_client(base_model=server.base.name, rank=4, seed=9).result()
    assert before.forward(data, "cross_entropy").result().metrics["loss:sum"] != pytest.approx(
        a.metrics["loss:sum"], rel=1e-4)  # the step did move the weights


def test_rest_listings_and_sampler_handles(server, tk):
    """The remaining read calls of the supported subset (docs/tinker.md's table), each through the SDK."""
    sc = sdk(server)
    rest = tinker.RestClient(base_url=server.url, api_key="tml-" + server.keys["acme"])
    caps = rest.get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == [server.base.name]
    tc = sc.create_lora_training_client(base_model=server.base.name, rank=4, seed=4).result()
    data = [datum(server.base.tokenizer, TEXTS[4])]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_weights_for_sampler("h1").result().path
    assert rest.get_training_run(tc.model_id).result().training_run_id == tc.model_id
    assert rest.get_training_run_by_tinker_path(path).result().training_run_id == tc.model_id
    assert path in [c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints]
    sampler = sc.create_sampling_client(model_path=path).result()
    assert sampler.get_base_model() == server.base.name
    prompt = types.ModelInput.from_ints(server.base.tokenizer.encode("every revision"))
    params = types.SamplingParams(max_tokens=4, temperature=0.0)
    want = list(sampler.sample(prompt, 1, params).result().sequences[0].tokens)
    again = tinker.SamplingClient.from_sampler_handle(sampler.get_sampler_handle(), api_key="tml-" + server.keys["acme"])
    assert list(again.sample(prompt, 1, params).result().sequences[0].tokens) == want  # the same sampler
    ephemeral = tc.save_weights_and_get_sampling_client().result()
    assert list(ephemeral.sample(prompt, 1, params).result().sequences[0].tokens) == want  # the same weights


def test_save_weights_external_is_a_peft_folder_downloadable_by_signed_urls(server, tk, tmp_path):
    """save_weights_external writes the run's weights as a PEFT folder (the export path); the SDK CLI's own
    downloader fetches it through get_external_weights_urls; it loads back as the same adapter; forgetting the
    user deletes it and its URLs stop working."""
    import urllib.error
    import urllib.request

    import httpx
    from tinker.cli.commands.checkpoint import _download_external_weights

    from lorafleet.adapters import load_peft
    from lorafleet.api.tinker.core import forget_checkpoint_files

    sc = sdk(server)
    tc = sc.create_lora_training_client(base_model=server.base.name, rank=4, seed=8,
                                        user_metadata={"lorafleet_adapter": "erin/ext"}).result()
    data = [datum(server.base.tokenizer, TEXTS[5])]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_weights_external("ext-1").result().path
    assert path == f"tinker://{tc.model_id}/external_weights/ext-1"
    rest = tinker.RestClient(base_url=server.url, api_key="tml-" + server.keys["acme"])
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[path].checkpoint_type == "external" and listed[path].size_bytes > 0
    got = _download_external_weights(rest, path, tmp_path / "dl", show_progress=False, format="json")
    assert got == listed[path].size_bytes
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = load_peft(tmp_path / "dl", server.base)
    run = tk.runs[tc.model_id]
    assert loaded.spec.rank == 4 and set(loaded.weights) == set(run.adapter.weights)
    for name, (A, B) in run.adapter.weights.items():
        assert torch.equal(loaded.weights[name][0], A.detach()) and torch.equal(loaded.weights[name][1], B.detach())
    w = rest.get_weights_info_by_tinker_path(path).result()
    assert (w.lora_rank, w.train_attn, w.train_mlp) == (4, True, True)

    url = next(iter(rest.get_external_weights_urls(path).result().urls.values()))
    forged = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(forged, timeout=30)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:  # a non-ASCII token (found by schemathesis): 404, not 500
        urllib.request.urlopen(url.rsplit("/", 1)[0] + "/.%C2%80", timeout=30)
    assert e.value.code == 404
    other = tinker.RestClient(base_url=server.url, api_key="tml-" + server.keys["globex"])
    with pytest.raises(Exception, match="does not exist"):
        other.get_external_weights_urls(path).result()
    h = {"X-API-Key": "tml-" + server.keys["acme"]}
    r = httpx.post(f"{server.url}/api/v1/save_weights_external", headers=h,
                   json={"model_id": tc.model_id, "path": "ext-2", "age_encryption_recipients": ["age1xyz"]})
    assert r.status_code == 400 and "age_encryption_recipients are not supported" in r.json()["error"]["message"]
    with pytest.raises(Exception, match="already exist"):
        tc.save_weights_external("ext-1").result()

    assert forget_checkpoint_files(tk.home, "acme", "erin") == 3  # the sidecar and the two files
    assert not (tk.home / "acme" / tc.model_id).exists()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url, timeout=30)
