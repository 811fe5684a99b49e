"""Run by tests/api/test_tinker_newest.py in a subprocess whose ``PYTHONPATH`` holds only the newest published
``tinker`` SDK (installed from PyPI into its own folder): the SFT + RL loop against a lorafleet server on loopback.

``python tinker_sdk_script.py URL API_KEY BASE_MODEL '[[token ids], ...]'`` prints one JSON object with what the
SDK saw; the test checks it against the server's own state. No lorafleet import here: only the SDK under test.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import tinker
from tinker import types


def main(url: str, key: str, base: str, rows: list[list[int]]) -> dict:
    sc = tinker.ServiceClient({"suite": "newest-sdk"}, base_url=url, api_key=key)
    tc = sc.create_lora_training_client(base_model=base, rank=4, seed=11,
                                        user_metadata={"lorafleet_adapter": "alice/newest-sdk"}).result()
    sft = [types.Datum(model_input=types.ModelInput.from_ints(r[:-1]),
                       loss_fn_inputs={"target_tokens": r[1:], "weights": [1.0] * (len(r) - 1)}) for r in rows]
    curve = []
    for _ in range(2):
        fb = tc.forward_backward(sft, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
        curve.append(fb.result().metrics["loss:sum"])
    logp = tc.forward(sft[:1], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy().astype(np.float64)
    delta = np.resize([-0.5, 0.0, 0.5], len(logp))
    adv = np.resize([1.0, -1.0], len(logp))
    rl = types.Datum(model_input=sft[0].model_input, loss_fn_inputs={
        "target_tokens": sft[0].loss_fn_inputs["target_tokens"], "logprobs": (logp - delta).astype(np.float32),
        "advantages": adv.astype(np.float32)})
    r = np.exp(delta)
    want = {"ppo": -np.minimum(r * adv, np.clip(r, 0.8, 1.2) * adv).sum(),
            "cispo": -(np.clip(r, 0.0, 4.0) * logp * adv).sum(), "dro": -(logp * adv - 0.25 * delta ** 2).sum()}
    rl_sums = {}
    for loss_fn, config in (("ppo", None), ("cispo", None), ("dro", {"beta": 0.5})):
        rl_sums[loss_fn] = [tc.forward_backward([rl], loss_fn, config).result().metrics["loss:sum"],
                            float(want[loss_fn])]
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    path = tc.save_weights_for_sampler("newest-1", user_metadata={"sdk": tinker.__version__}).result().path
    sampler = sc.create_sampling_client(model_path=path).result()
    seq = sampler.sample(types.ModelInput.from_ints(rows[0][:3]), 1,
                         types.SamplingParams(max_tokens=5, temperature=0.0)).result().sequences[0]
    rest = tinker.RestClient(base_url=url, api_key=key)
    ckpt = rest.list_checkpoints(tc.model_id).result().checkpoints[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental in the SDK
        found = rest.search_sessions(types.SessionSearchRequest(user_metadata={"suite": "newest-sdk"})).result()
    return {"version": tinker.__version__, "module": tinker.__file__, "run": tc.model_id, "curve": curve,
            "rl": rl_sums, "path": path, "tokens": list(seq.tokens), "prompt": rows[0][:3],
            "checkpoint_metadata": ckpt.user_metadata, "sessions": [s.session_id for s in found.sessions],
            "session_of_run": tc.model_id.split(":")[0]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))))
