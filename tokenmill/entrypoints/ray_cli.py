"""`tokenmill ray-serve`: the router and engine replicas as a Ray Serve application (needs the `ray` extra)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable

from tokenmill.cluster.ray_config import RayServeConfig
from tokenmill.config import EngineConfig
from tokenmill.entrypoints.config_args import add_config_args, config_from_args
from tokenmill.entrypoints.server_cli import add_server_args, server_config
from tokenmill.errors import ConfigError
from tokenmill.server.config import ServerConfig

logger = logging.getLogger(__name__)


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, RayServeConfig, "ray", "where the Ray cluster is and how replicas are placed and scaled")


def ray_config(args: argparse.Namespace) -> RayServeConfig:
    return config_from_args(RayServeConfig, args)


def add_ray_serve_parser(subparsers, add_engine_args: Callable[[argparse.ArgumentParser], None],
                         engine_config: Callable[[argparse.Namespace], EngineConfig]) -> None:
    p = subparsers.add_parser(
        "ray-serve", help="serve the OpenAI API from engine replicas on a Ray cluster (Ray Serve)",
        description="Deploy a router and engine replicas as a Ray Serve application and serve the OpenAI API "
                    "on --host/--port of every Ray node's Serve proxy. Each engine replica is a whole tokenmill "
                    "server (engine process + API); the router picks one per request with --routing. Join a "
                    "cluster started with `ray start` with --address auto, or run a private Ray instance here. "
                    "Ctrl-C or SIGTERM removes the application. Needs `pip install 'tokenmill[ray]'`.")
    add_ray_args(p)
    add_server_args(p)
    add_engine_args(p)

    def run(args: argparse.Namespace) -> int:
        return run_ray_serve(engine_config(args), server_config(args), ray_config(args))

    p.set_defaults(func=run)


def run_ray_serve(engine_config: EngineConfig, server_config: ServerConfig, config: RayServeConfig) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ConfigError(f"Ray is not installed ({e}); pip install 'tokenmill[ray]'") from None
    from tokenmill.cluster.ray_serve import build_application

    if config.address is None:
        ray.init(num_cpus=config.num_cpus, object_store_memory=config.object_store_memory,
                 include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=config.address, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": server_config.host, "port": server_config.port})
        name = server_config.served_model_name or engine_config.model
        app = build_application(engine_config, server_config, config, name, bind_host=server_config.host)
        logger.info("deploying %r: %s engine replica(s) of %s CPU each, routing %s", config.app_name,
                    f"{config.min_replicas}..{config.max_replicas}" if config.autoscaling else config.replicas,
                    config.replica_cpus, config.routing)
        # serve.run returns once every replica has loaded its model; wait in a thread so a signal still stops us.
        failure: list[BaseException] = []
        deployed = threading.Event()

        def deploy() -> None:
            try:
                serve.run(app, name=config.app_name, route_prefix="/")
            except BaseException as e:  # noqa: BLE001 - reported below
                failure.append(e)
            finally:
                deployed.set()

        threading.Thread(target=deploy, name="serve-deploy", daemon=True).start()
        while not deployed.wait(0.5):
            if stop.is_set():
                logger.info("stopped while deploying")
                return 130
        if failure:
            logger.error("deploying %r failed: %s", config.app_name, failure[0])
            return 1
        logger.info("serving on http://%s:%d (Ray Serve application %r)", server_config.host, server_config.port,
                    config.app_name)
        if config.detach:
            return 0
        stop.wait()
        logger.info("stopping: removing application %r (in-flight requests finish first)", config.app_name)
        return 0
    finally:
        if not config.detach:
            if config.address is None:
                serve.shutdown()
            else:
                serve.delete(config.app_name)
        ray.shutdown()
