"""Critic/reward server over PyTriton: protocol, server, client and subprocess launcher.

PyTriton is imported lazily (when a server starts or a client makes a call).
"""

from nemo_rlhf.servers.client import CriticClient
from nemo_rlhf.servers.critic_server import CriticServer, triton_env_fix
from nemo_rlhf.servers.process import ServerProcess, find_free_ports, start_server_process
from nemo_rlhf.servers.protocol import (
    ALL_MODELS,
    INFER_MODEL,
    LOAD_MODEL,
    SAVE_MODEL,
    STATUS_MODEL,
    TRAIN_MODEL,
    CriticBackend,
    CriticServerError,
    CriticServerRestarted,
    CriticServerUnavailable,
)

__all__ = [
    "ALL_MODELS",
    "INFER_MODEL",
    "LOAD_MODEL",
    "SAVE_MODEL",
    "STATUS_MODEL",
    "TRAIN_MODEL",
    "CriticBackend",
    "CriticClient",
    "CriticServer",
    "CriticServerError",
    "CriticServerRestarted",
    "CriticServerUnavailable",
    "ServerProcess",
    "find_free_ports",
    "start_server_process",
    "triton_env_fix",
]
