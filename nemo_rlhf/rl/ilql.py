"""ILQL: Implicit Language Q-Learning (Snell et al. 2022, "Offline RL for Natural Language
Generation with Implicit Language Q Learning", arXiv:2206.11871) — the losses, the target-head
Polyak update and the decoding shift, as pure tensor functions.

Token MDP (the paper's §3): the state at position ``t`` is the prefix ``tokens[:, :t+1]``, the
action is the next token ``tokens[:, t+1]``. Everything per token here uses the log-prob
convention of the rest of the package: ``[B, T]`` with ``T = S - 1`` for ``tokens [B, S]``, and
``mask [B, T]`` (1 on response actions, :func:`nemo_rlhf.rl.advantages.response_mask`).
A row with prompt length P and total length L takes actions at ``P-1 <= t <= L-2``; its terminal
state is position ``L-1`` (after the last token), whose value is 0.

The knobs are trlX's (``ILQLConfig``): ``tau`` (expectile), ``gamma`` (discount), ``cql_scale``,
``awac_scale``, ``alpha`` (Polyak rate of the target Q heads), ``beta`` (decoding shift); two Q
heads whose minimum (of the *target* copies) is the value target and the decoding advantage, as
the paper's §4 and trlX do. No megatron imports; any device, float dtype.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"ILQL: shapes differ: {shapes}")


def terminal_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards from sequence rewards: ``scores[b]`` at the row's last action, 0 elsewhere
    (the offline data rewards a whole response; Snell et al. 2022, §5 "terminal reward"; trlX's
    ``make_experience``).

    Args:
        scores: ``[B]`` float, one reward per sequence.
        mask: ``[B, T]`` float/bool, 1 on the row's actions (contiguous).

    Returns:
        ``[B, T]`` float32.

    Raises:
        ValueError: ``scores`` is not ``[B]`` for the mask's B, or a row has no action.
    """
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"terminal_rewards: scores must be [B={mask.shape[0]}], got {tuple(scores.shape)}")
    m = mask.to(torch.float32)
    if bool((m.sum(dim=1) == 0).any()):
        raise ValueError("terminal_rewards: a row has no action (empty mask row)")
    t = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = (t * (m > 0)).amax(dim=1)  # index of the last action
    out = torch.zeros_like(m)
    out[torch.arange(m.shape[0], device=m.device), last] = scores.to(torch.float32)
    return out


def next_state_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` float32: 1 where the state reached by action t (position ``t+1``) is itself a
    decision state of the response (``mask[:, t+1]``), 0 where it is terminal (after the last
    action). trlX's ``dones[:, 1:]``."""
    m = mask.to(torch.float32)
    out = torch.zeros_like(m)
    out[:, :-1] = m[:, 1:]
    return out * m


def q_targets(rewards: torch.Tensor, next_values: torch.Tensor, mask: torch.Tensor,
              gamma: float) -> torch.Tensor:
    """Bellman targets of the Q heads, ``r_t + gamma * V(s_{t+1})`` with ``V`` = 0 at terminal
    states and no gradient into ``V`` (Snell et al. 2022, eq. 2; trlX ``Q_``).

    Args:
        rewards: ``[B, T]`` per-token rewards (:func:`terminal_rewards`).
        next_values: ``[B, T]``: ``V(s_{t+1})``, i.e. the V head at position ``t+1``.
        mask: ``[B, T]`` actions (terminal handling via :func:`next_state_mask`).
        gamma: discount in [0, 1].

    Returns:
        ``[B, T]`` detached targets.

    Raises:
        ValueError: shapes differ, or ``gamma`` outside [0, 1].
    """
    _check_same_shape(rewards=rewards, next_values=next_values, mask=mask)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"q_targets: gamma must be in [0, 1], got {gamma}")
    return (rewards + gamma * next_values.detach() * next_state_mask(mask)).detach()


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """Elementwise asymmetric square ``|tau - 1(diff < 0)| * diff^2`` (the expectile regression of
    IQL, Kostrikov et al. 2021, eq. 5; Snell et al. 2022, eq. 3): ``tau`` weights ``diff >= 0``,
    ``1 - tau`` weights ``diff < 0``. ``diff = Q - V``.

    Raises:
        ValueError: ``tau`` outside (0, 1).
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"expectile_loss: tau must be in (0, 1), got {tau}")
    weight = torch.where(diff >= 0, torch.full_like(diff, tau), torch.full_like(diff, 1.0 - tau))
    return weight * diff.pow(2)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over actions / number of actions in the batch (trlX's ``/ n_nonterminal``; at least 1)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def gather_actions(q: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``q [B, T, V]`` at the taken ``actions [B, T]`` (int64) -> ``[B, T]``."""
    return q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def value_loss(target_q: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Expectile value loss ``mean_t L_tau(Qhat(s_t, a_t) - V(s_t))`` over actions, ``Qhat`` the
    (minimum of the) target Q heads, detached (Snell et al. 2022, eq. 3; trlX ``loss_v``).

    Args:
        target_q: ``[B, T]`` target-head Q of the taken actions (min over the two heads).
        values: ``[B, T]`` V head at the action's state (position t).
        mask: ``[B, T]``.
        tau: expectile in (0, 1); ``tau > 0.5`` pushes V towards the best actions' Q.

    Returns:
        scalar.
    """
    _check_same_shape(target_q=target_q, values=values, mask=mask)
    return _masked_mean(expectile_loss(target_q.detach() - values, tau), mask)


def q_loss(qs: Sequence[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over Q heads of ``mean_t (Q_i(s_t, a_t) - target_t)^2`` (Snell et al. 2022, eq. 2;
    trlX ``loss_q``).

    Args:
        qs: one ``[B, T]`` tensor per Q head (taken actions).
        targets: ``[B, T]`` from :func:`q_targets`.
        mask: ``[B, T]``.

    Returns:
        scalar.
    """
    return sum(_masked_mean((q - targets.detach()).pow(2), mask) for q in qs)


def cql_loss(q_logits: Sequence[torch.Tensor], actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The conservative (CQL) term, as trlX: the cross-entropy of each Q head's values over the
    vocabulary against the taken action, ``logsumexp_a Q(s, a) - Q(s, a_t)`` (Kumar et al. 2020,
    eq. 4 with a uniform proposal; Snell et al. 2022, eq. 5), summed over Q heads, mean over actions.

    Args:
        q_logits: one ``[B, T, V]`` tensor per Q head (vocabulary padding, if any, set very negative).
        actions: ``[B, T]`` int64 taken tokens (any value where ``mask`` is 0).
        mask: ``[B, T]``.

    Returns:
        scalar.
    """
    total = 0.0
    for q in q_logits:
        ce = F.cross_entropy(q.float().reshape(-1, q.shape[-1]), actions.reshape(-1), reduction="none")
        total = total + _masked_mean(ce.reshape(actions.shape), mask)
    return total


def awac_loss(logprobs: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The policy (AWAC) term: negative log-likelihood of the taken actions, each weighted by
    ``weight`` (:func:`awac_weights`, no gradient; None: 1, trlX's plain NLL), mean over actions
    (Nair et al. 2020, eq. 9; Snell et al. 2022, §4.2 "BC" head).

    Args:
        logprobs: ``[B, T]`` log pi(a_t | s_t) of the taken actions.
        mask: ``[B, T]``.
        weight: ``[B, T]`` or None.

    Returns:
        scalar.
    """
    nll = -logprobs
    if weight is not None:
        _check_same_shape(logprobs=logprobs, weight=weight)
        nll = nll * weight.detach()
    return _masked_mean(nll, mask)


AWAC_MAX_WEIGHT = 100.0  # IQL's EXP_ADV_MAX (Kostrikov et al. 2021, the authors' code)


def awac_weights(target_q: torch.Tensor, values: torch.Tensor, awac_beta: float) -> torch.Tensor:
    """The advantage weights of the AWAC term, ``min(exp(awac_beta * (Qhat - V)), 100)``, no
    gradient (Nair et al. 2020, eq. 9; Snell et al. 2022, §4.2). The cap is IQL's
    (Kostrikov et al. 2021, §4.3 policy extraction; their code's ``EXP_ADV_MAX = 100``): one
    overestimated action cannot take the whole batch's weight.

    Args:
        target_q: ``[B, T]`` the target heads' (minimum) Q of the taken actions.
        values: ``[B, T]`` V at the action's state.
        awac_beta: inverse temperature (>= 0; 0 gives weight 1 everywhere).

    Returns:
        ``[B, T]`` float, detached, in ``(0, AWAC_MAX_WEIGHT]``.

    Raises:
        ValueError: shapes differ or ``awac_beta`` < 0.
    """
    _check_same_shape(target_q=target_q, values=values)
    if awac_beta < 0:
        raise ValueError(f"awac_weights: awac_beta must be >= 0, got {awac_beta}")
    with torch.no_grad():
        return torch.exp(awac_beta * (target_q - values)).clamp(max=AWAC_MAX_WEIGHT)


def ilql_loss(logprobs: torch.Tensor, qs: Sequence[torch.Tensor], target_qs: Sequence[torch.Tensor],
              q_vocab: Sequence[torch.Tensor], values: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
              mask: torch.Tensor, *, tau: float, gamma: float, cql_scale: float, awac_scale: float,
              awac_beta: float = 0.0, cql_ce: Sequence[torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ILQL objective ``L_Q + L_V + cql_scale * L_CQL + awac_scale * L_AWAC`` (Snell et al.
    2022, §4; trlX ``ILQLConfig.loss``).

    Args:
        logprobs: ``[B, T]`` policy (LM head) log-probs of the taken actions.
        qs: per Q head ``[B, T]`` Q of the taken actions (trained).
        target_qs: per target Q head ``[B, T]`` (frozen copies; their minimum is ``Qhat``).
        q_vocab: per Q head ``[B, T, V]`` Q over the vocabulary (for CQL); ignored (may be None)
            when ``cql_ce`` is given.
        values: ``[B, S]`` V head at every position (``S = T + 1``; position ``t + 1`` gives
            ``V(s_{t+1})``).
        actions: ``[B, T]`` int64 ``tokens[:, 1:]``.
        rewards: ``[B, T]`` (:func:`terminal_rewards`).
        mask: ``[B, T]`` actions.
        tau, gamma, cql_scale, awac_scale: see the functions above.
        awac_beta: inverse temperature of the AWAC weight :func:`awac_weights` (0: plain NLL).
        cql_ce: per Q head ``[B, T]`` cross-entropy ``logsumexp_a Q(s, a) - Q(s, a_t)`` computed by
            the caller (e.g. vocabulary-parallel over TP ranks, ``models/vocab_parallel.py``); the
            CQL term is then their masked means summed, as :func:`cql_loss` does with ``q_vocab``.

    Returns:
        ``(loss, stats)``: scalar loss; stats ``loss_q``, ``loss_v``, ``loss_cql``, ``loss_awac``,
        ``q_mean``, ``v_mean``, ``target_q_mean`` (masked means, detached).

    Raises:
        ValueError: ``values`` not ``[B, T + 1]``, mismatched shapes, or a knob out of range.
    """
    b, t = mask.shape
    if tuple(values.shape) != (b, t + 1):
        raise ValueError(f"ilql_loss: values must be [B, T+1] = [{b}, {t + 1}], got {tuple(values.shape)}")
    per_head = q_vocab if cql_ce is None else cql_ce
    if not qs or len(qs) != len(target_qs) or len(qs) != len(per_head):
        raise ValueError(f"ilql_loss: need as many Q heads as target heads ({len(qs)} vs {len(target_qs)}, "
                         f"{len(per_head)} vocabulary outputs), at least one")
    v_now, v_next = values[:, :-1], values[:, 1:]
    target_q = torch.stack([q.detach() for q in target_qs]).amin(dim=0)
    loss_q = q_loss(qs, q_targets(rewards, v_next, mask, gamma), mask)
    loss_v = value_loss(target_q, v_now, mask, tau)
    if cql_ce is None:
        loss_cql = cql_loss(q_vocab, actions, mask)
    else:
        loss_cql = 0.0
        for ce in cql_ce:
            _check_same_shape(cql_ce=ce, mask=mask)
            loss_cql = loss_cql + _masked_mean(ce, mask)
    weight = awac_weights(target_q, v_now, awac_beta) if awac_beta else None
    loss_awac = awac_loss(logprobs, mask, weight)
    loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac
    with torch.no_grad():
        stats = {"loss_q": loss_q.detach(), "loss_v": loss_v.detach(), "loss_cql": loss_cql.detach(),
                 "loss_awac": loss_awac.detach(), "q_mean": _masked_mean(qs[0].detach(), mask),
                 "v_mean": _masked_mean(v_now.detach(), mask), "target_q_mean": _masked_mean(target_q, mask)}
    return loss, stats


@torch.no_grad()
def polyak_update_(targets: Iterable[torch.Tensor], sources: Iterable[torch.Tensor], alpha: float) -> None:
    """In place: ``target <- alpha * source + (1 - alpha) * target`` for each pair (Polyak
    averaging of the target Q heads; Snell et al. 2022, §4; trlX ``sync_target_q_heads``, whose
    ``alpha`` weights the *online* head). ``alpha = 1`` copies.

    Raises:
        ValueError: ``alpha`` outside [0, 1], or the two lists differ in length or shapes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"polyak_update_: alpha must be in [0, 1], got {alpha}")
    targets, sources = list(targets), list(sources)
    if len(targets) != len(sources):
        raise ValueError(f"polyak_update_: {len(targets)} target tensors but {len(sources)} sources")
    for t, s in zip(targets, sources):
        if t.shape != s.shape:
            raise ValueError(f"polyak_update_: shapes differ: {tuple(t.shape)} vs {tuple(s.shape)}")
        t.copy_(alpha * s.to(t.dtype) + (1.0 - alpha) * t)


def topk_mask(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``logits [..., V]`` with all but the ``top_k`` largest per row set to ``-inf`` (ties with the
    k-th kept); ``top_k <= 0`` or ``>= V``: unchanged."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def ilql_decode_logits(logits: torch.Tensor, target_qs: Sequence[torch.Tensor], values: torch.Tensor,
                       beta: float, top_k: int = 0) -> torch.Tensor:
    """ILQL's decoding distribution: ``log_softmax(logits) + beta * (Qhat - V)`` with
    ``Qhat = min_i Qtarget_i``, then top-k (Snell et al. 2022, eq. 6, ``pi(a|s) ∝ pi_beta(a|s)
    exp(beta (Q(s,a) - V(s)))``; trlX ``AutoModelForCausalLMWithILQLHeads.generate``). Sampling
    ``softmax(result / temperature)`` is trlX's sampler. ``beta = 0`` gives the policy's own
    distribution (log-softmax is a per-row shift of the logits).

    Args:
        logits: ``[B, V]`` policy logits of the next token (padding at -inf allowed).
        target_qs: per target Q head ``[B, V]``.
        values: ``[B]`` or ``[B, 1]`` V of the state.
        beta: advantage scale (>= 0).
        top_k: keep the k best (0: all).

    Returns:
        ``[B, V]`` float32 shifted (and top-k masked) logits.

    Raises:
        ValueError: no target head, or shapes that do not match ``[B, V]``.
    """
    if not target_qs:
        raise ValueError("ilql_decode_logits: need at least one target Q head")
    for q in target_qs:
        if q.shape != logits.shape:
            raise ValueError(f"ilql_decode_logits: a Q head is {tuple(q.shape)}, logits {tuple(logits.shape)}")
    v = values.reshape(-1, 1).float()
    if v.shape[0] != logits.shape[0]:
        raise ValueError(f"ilql_decode_logits: values hold {v.shape[0]} rows, logits {logits.shape[0]}")
    out = torch.log_softmax(logits.float(), dim=-1)
    if beta:
        q = torch.stack([q.float() for q in target_qs]).amin(dim=0)
        out = out + beta * (q - v)
    return topk_mask(out, top_k)


def standardize_rewards(scores: torch.Tensor) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` over the whole offline data set (trlX ``make_experience``;
    a single row or zero spread: only centred). ``scores [N]`` -> ``[N]`` float64."""
    r = scores.to(torch.float64)
    r = r - r.mean()
    if r.numel() > 1:
        std = r.std()
        if bool(std > 0):
            r = r / (std + torch.finfo(torch.float64).eps)
    return r
