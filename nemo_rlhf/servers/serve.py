"""The critic-server stage: build the critic + reward model from a Hydra config and serve them.

``launchers/serve_critic.py`` is a thin wrapper around :func:`serve_critic`.
"""

from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig

from nemo_rlhf.checkpoint.weights import load_weights
from nemo_rlhf.config import to_plain
from nemo_rlhf.data.tokenizer import tokenizer_from_config
from nemo_rlhf.models.critic import GPTCriticModel
from nemo_rlhf.models.reward_model import GPTRewardModel
from nemo_rlhf.parallel.state import setup_parallel
from nemo_rlhf.servers.megatron_backend import MegatronCriticBackend

LOG = logging.getLogger("nemo_rlhf")


def build_critic_backend(cfg: DictConfig):
    """The critic server's model pair: frozen reward model (``reward_model_path``; None: no reward
    model, the actor rewards with reward functions and the server returns zero scores) + critic
    initialised from ``critic_init_path`` or else the reward model."""
    setup_parallel(to_plain(cfg.model), (int(cfg.batch.global_batch_size), int(cfg.batch.micro_batch_size)),
                   cfg.trainer.accelerator, int(cfg.seed))
    tok = tokenizer_from_config(to_plain(cfg.tokenizer))
    rm = None
    if cfg.reward_model_path:
        rm = GPTRewardModel(to_plain(cfg.model), None, tok.vocab_size, int(cfg.batch.micro_batch_size))
        load_weights(rm, cfg.reward_model_path)
    critic = GPTCriticModel(to_plain(cfg.model), to_plain(cfg.optim), tok.vocab_size,
                            int(cfg.batch.micro_batch_size))
    init = cfg.get("critic_init_path") or cfg.reward_model_path
    load_weights(critic, init, skip_prefixes=() if init == cfg.reward_model_path else ("output_layer.",))
    max_seq = int(cfg.model.get("max_position_embeddings", 256))
    return MegatronCriticBackend(critic, rm, max_seq, value_clip=cfg.get("value_clip", 0.2))


def server_security(cfg: DictConfig, environ=None) -> tuple[str, str | None]:
    """``(checkpoint_root, auth_token)`` of the critic server from its config.

    ``server.checkpoint_root`` (default ``run_dir``) is the only tree ``critic_save``/``critic_load``
    may touch. The token is ``server.auth_token`` if set, else the environment variable named by
    ``server.auth_token_env`` (default ``NEMO_RLHF_CRITIC_TOKEN``; null: none), else ``None``
    (no authentication). The variable is then removed from ``environ`` so that Triton's child
    processes do not inherit it and PyTriton's DEBUG dump of their environment does not show it.

    Raises:
        ValueError: neither ``server.checkpoint_root`` nor ``run_dir`` is set, or a malformed token.
    """
    from nemo_rlhf.servers.protocol import DEFAULT_AUTH_TOKEN_ENV, resolve_auth_token

    environ = os.environ if environ is None else environ
    s = cfg.server
    root = s.get("checkpoint_root") or cfg.get("run_dir")
    if not root:
        raise ValueError("the critic server needs server.checkpoint_root (or run_dir): the directory that "
                         "critic_save/critic_load are confined to")
    token_env = s["auth_token_env"] if "auth_token_env" in s else DEFAULT_AUTH_TOKEN_ENV
    token = resolve_auth_token(s.get("auth_token"), token_env, environ, config_prefix="server")
    if token_env:
        environ.pop(str(token_env), None)
    return str(root), token


def serve_critic(cfg: DictConfig) -> None:
    """Serve the critic and reward model over PyTriton until SIGTERM/SIGINT.

    With several processes (``torchrun``/``srun``, world = TP x PP of ``model``), global rank 0
    runs the server and broadcasts each request to the other ranks, which run the same collective
    model calls (:mod:`nemo_rlhf.servers.distributed`). The server has no data parallelism: a
    world that is not exactly TP x PP is refused. ``critic_save``/``critic_load`` are confined to
    ``server.checkpoint_root`` (default ``run_dir``) and authentication is on when a token is
    configured (:func:`server_security`); ``server.log_level`` sets the level of the
    ``nemo_rlhf.servers`` loggers (``DEBUG``: the traceback of every error reply, by error id).

    Raises:
        LayoutError: the server's layout does not match its world size.
        ValueError: no checkpoint root, or a malformed token.
    """
    from nemo_rlhf.parallel.layout import LayoutError
    from nemo_rlhf.parallel.state import read_dist_env
    from nemo_rlhf.servers.critic_server import CriticServer, triton_env_fix
    from nemo_rlhf.servers.distributed import LeaderBackend, command_group, follow

    world = read_dist_env().world_size
    tp = int(cfg.model.get("tensor_model_parallel_size", 1) or 1)
    pp = int(cfg.model.get("pipeline_model_parallel_size", 1) or 1)
    if world != tp * pp:
        raise LayoutError(
            f"invalid critic-server layout: world size {world} != model.tensor_model_parallel_size={tp} "
            f"* model.pipeline_model_parallel_size={pp}; the critic server runs one model replica "
            f"(no data parallelism): launch it with {tp * pp} processes")
    triton_env_fix()
    checkpoint_root, auth_token = server_security(cfg)  # every rank: followers drop the variable too
    logging.getLogger("nemo_rlhf.servers").setLevel(str(cfg.server.get("log_level") or "INFO").upper())
    backend = build_critic_backend(cfg)
    group = command_group() if world > 1 else None
    if group is not None and torch.distributed.get_rank() != 0:
        follow(backend, group)
        return
    s = cfg.server
    port = int(s.port)
    server = CriticServer(LeaderBackend(backend, group) if group is not None else backend,
                          host=s.host, http_port=port,
                          grpc_port=int(s.get("grpc_port") or port + 1),
                          metrics_port=int(s.get("metrics_port") or port + 2),
                          max_batch_size=int(s.get("max_batch_size", 64)),
                          checkpoint_root=checkpoint_root, auth_token=auth_token)
    LOG.info("critic server starting at %s (world size %d, TP=%d, PP=%d, authentication %s, checkpoint root %s)",
             server.url, world, tp, pp, "on" if auth_token else "off", server.checkpoint_root)
    try:
        server.run()
    finally:
        if group is not None:
            server.backend.stop_followers()
