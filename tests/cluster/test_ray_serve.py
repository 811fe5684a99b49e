"""lorafleet on a local Ray Serve: 2 engine replicas, 20 adapters, affinity, rollback, a replica killed mid-run.

Everything goes through HTTP to Serve's proxy, as a client would; answers are checked against the same
adapters run through a local ``Engine`` (greedy, so the text must match exactly).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("ray.serve")

from _cluster import adapter_refs, commit_live  # noqa: E402

from lorafleet.cluster.remote import AFFINITY_HEADER, REPLICA_HEADER  # noqa: E402

pytestmark = pytest.mark.postgres
PROMPT = [{"role": "user", "content": "Tell me something about the sea."}]
SHORT, LONG = 8, 48


@pytest.fixture(scope="module")
def local_engine(ray_cluster):
    from lorafleet.serving.engine import Engine
    from lorafleet.serving.params import EngineConfig
    from lorafleet.serving.sources import registry_fetch

    with Engine(ray_cluster.base, registry_fetch(ray_cluster.registry),
                EngineConfig(max_batch=8, max_active=8, max_cached=32, max_rank=8)) as engine:
        yield engine


def expected(engine, digests: list[str], max_tokens: int) -> list[str]:
    from lorafleet.serving.params import SamplingParams

    results = engine.generate([PROMPT] * len(digests), digests, SamplingParams(max_tokens=max_tokens))
    return [r.raise_for_error().text for r in results]


@pytest.fixture(scope="module")
def reference(ray_cluster, local_engine) -> dict[str, str]:
    refs = adapter_refs()
    return dict(zip(refs, expected(local_engine, [ray_cluster.digests[r] for r in refs], SHORT), strict=True))


def chat(cluster, model: str, *, max_tokens: int = SHORT, key: str = "tenant", retries: int = 0,
         client: httpx.Client | None = None, attempts: list | None = None) -> httpx.Response:
    """POST /v1/chat/completions (greedy); retry on 5xx / connection errors, as OpenAI clients do."""
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    headers = {"authorization": f"Bearer {cluster.keys[key]}"}
    for attempt in range(retries + 1):
        try:
            r = (client or httpx).post(f"{cluster.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        except httpx.TransportError:
            if attempt == retries:
                raise
            r = None
        if attempts is not None:
            attempts.append(None if r is None else r.status_code)
        if r is not None and r.status_code < 500:
            return r
    return r


def fleet(cluster) -> dict:
    r = httpx.get(f"{cluster.url}/v1/fleet/residency", headers={"authorization": f"Bearer {cluster.keys['admin']}"},
                  timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_twenty_adapters_are_answered_correctly_by_both_replicas(ray_cluster, reference):
    refs = adapter_refs()
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda ref: chat(ray_cluster, ref, client=client), refs))
    for ref, r in zip(refs, responses, strict=True):
        assert text_of(r) == reference[ref], ref
        assert r.json()["lorafleet"]["digest"] == ray_cluster.digests[ref]
    served_by = {r.headers[REPLICA_HEADER] for r in responses}
    assert len(served_by) == 2, f"one replica answered everything: {served_by}"

    def settled():  # reports lag by up to one interval: wait until they show every lease
        v = fleet(ray_cluster)
        resident = set().union(*(set(rep["multiplexed"]) for rep in v["replicas"]))
        return v["totals"]["replicas"] == 2 and resident >= set(ray_cluster.digests.values()) and v

    view = wait_for(settled, 15, "both replicas' reports to show all 20 adapters multiplexed")
    assert view["totals"]["adapter_requests"] >= 20
    assert all(rep["routing"]["requests"] > 0 for rep in view["replicas"]), view["totals"]


def test_streaming_errors_and_metrics_go_through_the_cluster(ray_cluster, reference, local_engine):
    ref = adapter_refs()[3]
    body = {"model": ref, "messages": PROMPT, "max_tokens": SHORT, "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {ray_cluster.keys['tenant']}"}
    text = ""
    with httpx.stream("POST", f"{ray_cluster.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"].get("content") or ""
    assert text == reference[ref]

    too_long = {"model": ref, "messages": [{"role": "user", "content": "sea " * 5000}], "max_tokens": 4}
    r = httpx.post(f"{ray_cluster.url}/v1/chat/completions", json=too_long, headers=headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = chat(ray_cluster, "globex/gina/style")  # another tenant's name: the same 404 as a missing adapter
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    broken = commit_live(ray_cluster.registry, ray_cluster.base, "acme/broken/style", seed=5)
    ray_cluster.registry.blobs.delete(broken)  # the catalog names it, the blob store lost it
    r = chat(ray_cluster, "acme/broken/style")
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed", r.text
    assert f"adapter {broken[:12]} could not be loaded: MissingBlobError" in r.json()["error"]["message"]
    assert text_of(chat(ray_cluster, ref)) == reference[ref]  # nobody else is affected

    assert httpx.get(f"{ray_cluster.url}/metrics", timeout=30).status_code == 401  # admin only by default
    metrics = httpx.get(f"{ray_cluster.url}/metrics", timeout=30,
                        headers={"authorization": f"Bearer {ray_cluster.keys['admin']}"})
    assert metrics.status_code == 200 and "lorafleet_adapter_lookups" in metrics.text
    assert httpx.get(f"{ray_cluster.url}/health", timeout=30).json()["engine"] is True

    # a stacked adapter (a child over its parent): the replica leases both levels, the answer is the stack's
    ray_cluster.registry.create_adapter("acme/u03/kid", parent=ref)
    kid = commit_live(ray_cluster.registry, ray_cluster.base, "acme/u03/kid", seed=77)
    r = chat(ray_cluster, "acme/u03/kid")
    assert [lvl["digest"] for lvl in r.json()["lorafleet"]["stack"]] == [ray_cluster.digests[ref], kid]
    assert text_of(r) == expected(local_engine, [(ray_cluster.digests[ref], kid)], SHORT)[0]

    # the dashboard's API reads the fleet as one engine; pinning by hand is refused with the reason
    admin = {"authorization": f"Bearer {ray_cluster.keys['admin']}"}
    live = httpx.get(f"{ray_cluster.url}/ui/api/live", headers=admin, timeout=30)
    assert live.status_code == 200, live.text
    assert live.json()["tiers"]["slots_max"] == 2 * ray_cluster.config.engine.max_active
    where = httpx.get(f"{ray_cluster.url}/ui/api/adapters/{ref}/residency", headers=admin, timeout=30).json()
    assert where["digest"] == ray_cluster.digests[ref] and where["tier"] in ("slot", "ram")
    r = httpx.post(f"{ray_cluster.url}/ui/api/adapters/{ref}/pin", json={"pinned": True}, headers=admin, timeout=30)
    assert r.status_code == 409 and "not available with --cluster ray" in r.json()["error"]["message"], r.text


def test_repeated_requests_land_on_a_replica_that_has_the_adapter(ray_cluster, reference):
    time.sleep(5 * ray_cluster.config.report_interval_s)  # the board has every earlier request
    before = fleet(ray_cluster)["totals"]
    hits = n = 0
    with httpx.Client() as client:
        for _ in range(2):
            for ref in adapter_refs():
                r = chat(ray_cluster, ref, client=client)
                assert text_of(r) == reference[ref]
                hits += r.headers[AFFINITY_HEADER] == "hit"
                n += 1
    rate = hits / n
    print(f"affinity: {hits}/{n} repeated requests landed on a replica with the adapter resident ({rate:.0%})")
    assert rate >= 0.9
    after = wait_for(lambda: (t := fleet(ray_cluster)["totals"])["adapter_requests"] - before["adapter_requests"] >= n
                     and t, 15, "the fleet board to count the requests")
    assert after["affinity_hits"] - before["affinity_hits"] == hits  # the fleet view counts what clients saw


def burst_until_both_replicas(cluster, ref: str) -> list[httpx.Response]:
    """Bursts of concurrent requests for one adapter until both replicas have answered (max_ongoing_requests=1
    makes the router spill past the replica that holds it once that is busy for 0.1-0.2 s)."""
    seen: list[httpx.Response] = []
    with httpx.Client() as client, ThreadPoolExecutor(12) as pool:
        for _ in range(10):
            seen += list(pool.map(lambda _: chat(cluster, ref, max_tokens=LONG, client=client), range(12)))
            if len({r.headers.get(REPLICA_HEADER) for r in seen}) >= 2:
                return seen
    raise AssertionError(f"10 bursts for {ref} were all answered by {seen[0].headers.get(REPLICA_HEADER)}")


def test_a_rollback_takes_effect_on_every_replica(ray_cluster, local_engine):
    ref = "acme/roll/style"  # its own adapter: the other tests' references stay valid
    rev1 = commit_live(ray_cluster.registry, ray_cluster.base, ref, seed=998)
    rev2 = commit_live(ray_cluster.registry, ray_cluster.base, ref, seed=999)
    text1, text2 = expected(local_engine, [rev1, rev2], LONG)
    assert text1 != text2

    for r in burst_until_both_replicas(ray_cluster, ref):  # both replicas now hold revision 2
        assert text_of(r) == text2 and r.json()["lorafleet"]["revision"] == f"{ref}#2"

    t, u, a = ref.split("/")
    r = httpx.post(f"{ray_cluster.url}/v1/adapters/{t}/{u}/{a}/rollback", json={"reason": "test"},
                   headers={"authorization": f"Bearer {ray_cluster.keys['admin']}"}, timeout=30)
    assert r.status_code == 200, r.text
    after = burst_until_both_replicas(ray_cluster, ref)
    for r in after:
        meta = r.json()["lorafleet"]
        assert (meta["revision"], meta["digest"]) == (f"{ref}#1", rev1)
        assert text_of(r) == text1
    assert len({r.headers[REPLICA_HEADER] for r in after}) == 2


def test_a_killed_replica_is_replaced_and_retries_complete_every_request(ray_cluster, local_engine):
    import ray
    from ray import serve

    refs = adapter_refs()  # longer answers than elsewhere, so the kill finds requests in flight
    reference = dict(zip(refs, expected(local_engine, [ray_cluster.digests[r] for r in refs], LONG), strict=True))
    clients, per_client = 4, 10
    done, kill_after = threading.Event(), 8
    finished: list[httpx.Response] = []
    attempts: list[list] = [[] for _ in range(clients)]
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        with httpx.Client() as client:
            for j in range(per_client):
                ref = refs[(i * per_client + j) % len(refs)]
                r = chat(ray_cluster, ref, max_tokens=LONG, client=client, retries=1, attempts=attempts[i])
                with lock:
                    finished.append((ref, r))
                    if len(finished) >= kill_after:
                        done.set()

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    assert done.wait(120), "the clients made no progress"
    with lock:
        victim = finished[-1][1].headers[REPLICA_HEADER]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed_at = time.monotonic()
    for th in threads:
        th.join(timeout=180)
    assert len(finished) == clients * per_client
    for ref, r in finished:
        assert text_of(r) == reference[ref], ref
    failed_first = sum(1 for a in attempts for s in a if s is None or s >= 500)
    print(f"killed {victim}; {failed_first} attempt(s) failed and were retried (at most {clients} in flight)")
    assert failed_first <= clients

    def replaced():
        status = serve.status().applications["lorafleet"].deployments["EngineReplica"]
        return status.replica_states.get("RUNNING", 0) == 2

    wait_for(replaced, 90, "Serve to replace the killed replica", step=0.5)
    survivor_and_new = set()
    base_name = ray_cluster.base.name

    def new_replica_serves():
        r = chat(ray_cluster, base_name, retries=1)
        assert r.status_code == 200, r.text
        survivor_and_new.add(r.headers[REPLICA_HEADER])
        return len(survivor_and_new - {victim}) == 2

    wait_for(new_replica_serves, 60, "the replacement replica to answer")
    print(f"replacement serving {time.monotonic() - killed_at:.1f} s after the kill")
