"""A gateway simulator: a real HTTP server that follows the documented fine-tuning API,
signs upload URLs like S3, validates uploaded data for real, and injects faults."""

from typing import TYPE_CHECKING, Any

from orchestrator.simulator.config import DEFAULT_API_KEY, SimConfig

if TYPE_CHECKING:
    from orchestrator.simulator.server import Simulator, SimulatorThread, running_simulator

__all__ = ["DEFAULT_API_KEY", "SimConfig", "Simulator", "SimulatorThread", "running_simulator"]


def __getattr__(name: str) -> Any:
    # The server (aiohttp.web) loads on first use, not with every `orchestrator` command.
    if name in ("Simulator", "SimulatorThread", "running_simulator"):
        from orchestrator.simulator import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
