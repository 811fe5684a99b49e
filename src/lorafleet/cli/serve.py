"""CLI: ``lorafleet serve`` and ``lorafleet keys create|ls|revoke``."""

from __future__ import annotations

import typer
from rich.table import Table

from lorafleet.api.keys import KeyStore
from lorafleet.cli.common import BaseDtypeOpt, console, handle_errors, print_json, settings, use_base_dtype
from lorafleet.cluster.config import ClusterConfigError
from lorafleet.cluster.launch import check_fits, config_from_env, connect, deploy, require_ray
from lorafleet.config import quiet_libraries
from lorafleet.registry import Registry
from lorafleet.registry.imports import parse_lora_module
from lorafleet.serving.params import EngineConfig

keys_app = typer.Typer(help="API keys of the HTTP service (stored hashed).", no_args_is_help=True)
ADMIN_KEY_ENV = "LORAFLEET_ADMIN_KEY"


def _keys():
    return KeyStore(Registry.open_default(settings()))


@keys_app.command("create")
@handle_errors
def keys_create(tenant: str | None = typer.Option(None, help="the tenant this key may use"),
                admin: bool = typer.Option(False, "--admin", help="an admin key (management routes, every tenant)"),
                name: str = typer.Option("", help="a label"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Create a key; the secret is printed once and never stored."""
    key, secret = _keys().create(tenant=tenant, admin=admin, name=name)
    if as_json:
        print_json({**key.to_dict(), "secret": secret})
        return
    console.print(f"key {key.id} ({key.role}{' for ' + key.tenant if key.tenant else ''}) created; its secret, shown "
                  "once:")
    typer.echo(secret)


@keys_app.command("ls")
@handle_errors
def keys_ls(tenant: str | None = typer.Option(None), revoked: bool = typer.Option(False, "--revoked"),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """List keys (never their secrets)."""
    keys = _keys().list(tenant=tenant, include_revoked=revoked)
    if as_json:
        print_json([k.to_dict() for k in keys])
        return
    table = Table(title="API keys")
    for col in ("id", "prefix", "role", "tenant", "name", "created", "revoked"):
        table.add_column(col)
    for k in keys:
        table.add_row(str(k.id), k.prefix + "…", k.role, k.tenant or "", k.name, k.created_at.isoformat(timespec="seconds"),
                      k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "")
    console.print(table)


@keys_app.command("revoke")
@handle_errors
def keys_revoke(key_id: int) -> None:
    """Revoke a key: it stops working at once."""
    key = _keys().revoke(key_id)
    console.print(f"key {key.id} revoked")


def build_service(base_name: str | None = None, *, worker: bool = True, engine_config=None,
                  metrics_public: bool = False):
    """Load the base, open the registry, build the engine; shared by `serve` and tests/benchmarks."""
    quiet_libraries()
    from lorafleet.api.service import Service  # noqa: PLC0415 - defers torch/fastapi
    from lorafleet.base import load_base  # noqa: PLC0415 - defers torch/transformers/triton
    from lorafleet.serving.engine import Engine  # noqa: PLC0415 - defers torch/transformers
    from lorafleet.serving.sources import registry_fetch  # noqa: PLC0415 - defers torch

    registry = Registry.open_default(settings())
    base = load_base(base_name or settings().base)
    engine = Engine(base, registry_fetch(registry), engine_config)
    return Service(registry, base, engine, run_worker=worker, metrics_public=metrics_public)


def bootstrap_admin_key(keys) -> None:
    """$LORAFLEET_ADMIN_KEY becomes an admin key; with none at all, create one and print it once."""
    bootstrap = settings().admin_key
    if bootstrap:
        keys.ensure(bootstrap, admin=True, name=f"${ADMIN_KEY_ENV}")
    elif not any(k.is_admin for k in keys.list()):
        _, secret = keys.create(admin=True, name="bootstrap")
        console.print(f"no admin key existed; created one (shown once): [bold]{secret}[/]")


def serve_ray(*, base: str | None, engine, replicas: int, replica_cpus: float, host: str, port: int,
              address: str | None, metrics_public: bool = False) -> None:
    """``lorafleet serve --cluster ray``: check the config, make sure an admin key exists, run until Ctrl-C."""
    try:
        config = config_from_env(settings(), base=base or settings().base, replicas=replicas,
                                 replica_cpus=replica_cpus, engine=engine, metrics_public=metrics_public)
        require_ray()
    except ClusterConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--cluster ray") from None

    with Registry(config.db_url, config.blob_url) as registry:  # keys live in the shared registry
        bootstrap_admin_key(KeyStore(registry))
    address = address or settings().ray_address
    local = not address
    connect(address)
    if local:
        try:
            check_fits(config)
        except ClusterConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint="--replica-cpus") from None
    console.print(f"deploying {config.replicas} engine replica(s) of {config.base or 'the default base'} on Ray "
                  f"Serve; serving on http://{host}:{port} (docs: /docs, fleet: /v1/fleet/residency)")
    deploy(config, host=host, port=port, blocking=True)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")

    @app.command("serve")
    @handle_errors
    def serve_cmd(host: str = typer.Option("127.0.0.1", help="address to listen on"),
                  port: int = typer.Option(8000, min=1, max=65535),
                  base: str | None = typer.Option(None, "--base"),
                  base_dtype: str | None = BaseDtypeOpt,
                  worker: bool = typer.Option(True, "--worker/--no-worker",
                                              help="run a training worker in this process"),
                  max_batch: int = typer.Option(32, "--max-batch", min=1),
                  max_active: int = typer.Option(32, "--max-active", min=1, help="adapters in compute slots"),
                  max_cached: int = typer.Option(256, "--max-cached", min=1, help="adapters kept in RAM"),
                  max_rank: int = typer.Option(16, "--max-rank", min=1, max=64),
                  cluster: str = typer.Option("local", "--cluster",
                                              help="local: one process; ray: engine replicas on Ray Serve "
                                                   "(needs $LORAFLEET_DB_URL on PostgreSQL, see docs/cluster.md)"),
                  replicas: int = typer.Option(2, "--replicas", min=1, help="--cluster ray: engine replicas"),
                  replica_cpus: float = typer.Option(1.0, "--replica-cpus", min=0.0,
                                                     help="--cluster ray: CPUs per engine replica"),
                  ray_address: str | None = typer.Option(None, "--ray-address",
                                                         help="--cluster ray: join this Ray cluster (default: "
                                                              "$RAY_ADDRESS, else start a local one)"),
                  metrics_public: bool = typer.Option(False, "--metrics-public", envvar="LORAFLEET_METRICS_PUBLIC",
                                                      help="serve /metrics without a key (default: admin key)"),
                  lora_modules: list[str] | None = typer.Option(
                      None, "--lora-modules",
                      help="vLLM-style: name=path (or JSON {\"name\", \"path\"}) of a PEFT folder to import at "
                           "start and serve as model 'name' (local/lora/name); repeat it")) -> None:
        """Serve the OpenAI-compatible API, the management API and /metrics over HTTP."""
        use_base_dtype(base_dtype)

        config = EngineConfig(max_batch=max_batch, max_active=max_active, max_cached=max_cached, max_rank=max_rank)
        if cluster not in ("local", "ray"):
            raise typer.BadParameter(f"must be 'local' or 'ray', got {cluster!r}", param_hint="--cluster")
        modules = [parse_lora_module(m) for m in lora_modules or []]  # malformed values fail before the base loads
        if cluster == "ray":
            if modules:
                raise typer.BadParameter("not supported with --cluster ray; import them first with "
                                         "`lorafleet adapters import PATH --as local/lora/NAME --alias live`",
                                         param_hint="--lora-modules")
            serve_ray(base=base, engine=config, replicas=replicas, replica_cpus=replica_cpus, host=host, port=port,
                      address=ray_address, metrics_public=metrics_public)
            return
        import uvicorn  # noqa: PLC0415

        from lorafleet.api.app import create_app  # noqa: PLC0415 - defers torch/fastapi

        with console.status("loading the base and the registry…"):
            service = build_service(base, worker=worker, engine_config=config, metrics_public=metrics_public)
        bootstrap_admin_key(service.keys)
        for name, path in modules:
            res = service.load_lora(name, path, creator="cli:serve --lora-modules", replace=True)
            console.print(f"--lora-modules: {name} = {res.ref}#{res.number} ({res.status}, from {res.source})",
                          highlight=False, markup=False)
        console.print(f"serving {service.base.name} on http://{host}:{port}  (docs: /docs, metrics: /metrics"
                      f"{', public' if metrics_public else ', admin key'})")
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
