"""A gateway simulator: a real HTTP server that follows the documented fine-tuning API,
signs upload URLs like S3, validates uploaded data for real, and injects faults."""

from orchestrator.simulator.config import DEFAULT_API_KEY, SimConfig
from orchestrator.simulator.server import Simulator, SimulatorThread, running_simulator

__all__ = ["DEFAULT_API_KEY", "SimConfig", "Simulator", "SimulatorThread", "running_simulator"]
