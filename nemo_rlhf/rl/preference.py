"""Offline preference-optimisation losses (the DPO family) on per-sequence log-probabilities.

Every function takes the summed log-probabilities (nats) of whole responses, one value per pair:
``policy_chosen_logps [B]`` = ``sum_t log pi(y_w,t | x, y_w,<t)`` over the response tokens of the
chosen response y_w (prompt tokens masked), likewise ``policy_rejected_logps`` for y_l and
``ref_*_logps`` under the frozen reference policy. Length-normalised variants (IPO as TRL, SimPO)
also take the response lengths in tokens, ``chosen_lengths`` / ``rejected_lengths [B]``.

Losses are returned per pair (``[B]``); :func:`preference_loss` is the one entry point a trainer
calls: it picks the variant by name (``loss_type``), averages over pairs and returns TRL-named
metrics. Half-precision inputs are upcast to float32; float64 stays float64.

=============  ==========================================================================
``loss_type``  per-pair loss (Δ = log-ratio margin, see :func:`dpo_loss`)
=============  ==========================================================================
``sigmoid``    DPO, Rafailov et al. 2023 eq. 7; with ``label_smoothing`` ε the conservative
               DPO (cDPO) of Mitchell 2023: ``-(1-ε) logσ(βΔ) - ε logσ(-βΔ)``
``robust``     robust DPO, Chowdhury et al. 2024 (TRL's ``robust``): the unbiased loss under
               label-flip rate ε
``ipo``        IPO, Azar et al. 2023 eq. 17, on length-normalised log-ratios (as TRL)
``rpo``        RPO, Pang et al. 2024 (DPO+NLL): ``sigmoid`` + α · NLL per token of the chosen responses
``simpo``      SimPO, Meng et al. 2024 eq. 6: reference-free, average log-probs, margin γ
=============  ==========================================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_rlhf.rl.masked import check_float, check_same_shape

PREFERENCE_LOSSES = ("sigmoid", "robust", "ipo", "rpo", "simpo")
REFERENCE_FREE_LOSSES = ("simpo",)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _pairs(**tensors: torch.Tensor | None) -> list[torch.Tensor]:
    """Check that every given tensor is a float ``[B]`` (B > 0) of one shape; return them upcast."""
    first_name, first = None, None
    out = []
    for name, t in tensors.items():
        check_float(name, t)
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{name} must be [B] with B > 0 (one value per pair), got shape {tuple(t.shape)}")
        if first is None:
            first_name, first = name, t
        else:
            check_same_shape(name, t, first_name, first)
        out.append(_upcast(t))
    return out


def _lengths(name: str, lengths: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``lengths [B]`` (tokens, any numeric dtype) as ``like``'s dtype; must be >= 1."""
    if lengths is None:
        raise ValueError(f"{name} is required by the length-normalised losses (ipo, simpo, rpo)")
    if not torch.is_tensor(lengths) or lengths.shape != like.shape:
        raise ValueError(f"{name} must be a [B] tensor of shape {tuple(like.shape)}, got "
                         f"{tuple(lengths.shape) if torch.is_tensor(lengths) else type(lengths).__name__}")
    if bool((lengths < 1).any()):
        raise ValueError(f"{name} must be >= 1 token per response, got {lengths.tolist()}")
    return lengths.to(like.dtype)


def _check_beta(beta: float, name: str = "beta") -> float:
    beta = float(beta)
    if not beta > 0.0 or beta != beta or beta == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {beta}")
    return beta


def _check_smoothing(label_smoothing: float, high: float = 0.5) -> float:
    eps = float(label_smoothing)
    if not 0.0 <= eps < high:
        raise ValueError(f"label_smoothing must be in [0, {high:g}), got {eps}")
    return eps


def dpo_logits(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor) -> torch.Tensor:
    """The DPO log-ratio margin ``Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: float
            ``[B]`` summed response log-probs (nats).

    Returns:
        ``[B]`` float32 (float64 for float64 inputs).

    Raises:
        TypeError: non-float inputs. ValueError: shapes not one ``[B]``.
    """
    pc, pr, rc, rr = _pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    return (pc - rc) - (pr - rr)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO loss per pair (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7)::

        L = -log σ(β Δ),   Δ = dpo_logits(...)

    With ``label_smoothing`` ε > 0 the conservative DPO of Mitchell 2023 ("A note on DPO with noisy
    preferences & relationship to IPO"; TRL's ``label_smoothing`` of ``sigmoid`` before 1.x, and of
    ``CPOTrainer``'s ``sigmoid`` in 1.16): the labels are flipped with probability ε,
    ``L = -(1-ε) log σ(βΔ) - ε log σ(-βΔ)``.

    Args:
        policy_*_logps, ref_*_logps: float ``[B]`` summed response log-probs (nats).
        beta: β > 0, the KL-regularisation strength (the implicit reward's scale).
        label_smoothing: ε in ``[0, 0.5)``.

    Returns:
        ``[B]`` float32/float64 losses (nats).

    Raises:
        TypeError: non-float inputs. ValueError: shapes, β <= 0, ε outside ``[0, 0.5)``.
    """
    beta, eps = _check_beta(beta), _check_smoothing(label_smoothing)
    z = beta * dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = -F.logsigmoid(z)
    return (1.0 - eps) * loss - eps * F.logsigmoid(-z) if eps else loss


def robust_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                    beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO per pair (Chowdhury et al. 2024, "Provably Robust DPO", the de-biased loss; TRL's ``robust``):
    the unbiased loss under a label-flip rate ε::

        L = ((1-ε)(-log σ(βΔ)) - ε(-log σ(-βΔ))) / (1 - 2ε)

    ε = 0 gives :func:`dpo_loss`. Arguments, returns and errors as :func:`dpo_loss`.
    """
    beta, eps = _check_beta(beta), _check_smoothing(label_smoothing)
    z = beta * dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """IPO per pair (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", eq. 17, τ = ``beta``), on length-normalised log-ratios as TRL 1.16 computes it::

        h = (log π(y_w) - log π_ref(y_w)) / |y_w| - (log π(y_l) - log π_ref(y_l)) / |y_l|
        L = (h - 1 / (2τ))²

    The paper writes h on whole-sequence log-ratios; TRL divides each log-ratio by its response's
    token count (confirmed with the IPO authors, per TRL's comment, and the form the paper's results
    use), so β is comparable across lengths. We follow TRL.

    Args:
        policy_*_logps, ref_*_logps: float ``[B]`` summed response log-probs (nats).
        chosen_lengths, rejected_lengths: ``[B]`` response lengths in tokens (>= 1).
        beta: τ > 0.

    Returns:
        ``[B]`` float32/float64 losses.

    Raises:
        TypeError: non-float log-probs. ValueError: shapes, lengths < 1, τ <= 0.
    """
    beta = _check_beta(beta)
    pc, pr, rc, rr = _pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    lc, lr = _lengths("chosen_lengths", chosen_lengths, pc), _lengths("rejected_lengths", rejected_lengths, pc)
    h = (pc - rc) / lc - (pr - rr) / lr
    return (h - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO per pair (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", eq. 6): reference-free, average log-probs, target margin γ::

        L = -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ)

    ``gamma`` is TRL's ``simpo_gamma`` (an absolute margin, in units of the reward β·avg-log-prob;
    TRL's ``CPOTrainer`` divides it by β before multiplying back). ``label_smoothing`` ε mixes in the
    flipped label as :func:`dpo_loss` does (TRL's CPO ``simpo`` accepts it too).

    Args:
        policy_chosen_logps, policy_rejected_logps: float ``[B]`` summed response log-probs (nats).
        chosen_lengths, rejected_lengths: ``[B]`` response lengths in tokens (>= 1).
        beta: β > 0 (the paper uses 2.0-2.5). gamma: γ >= 0.
        label_smoothing: ε in ``[0, 0.5)``.

    Returns:
        ``[B]`` float32/float64 losses.

    Raises:
        TypeError: non-float log-probs. ValueError: shapes, lengths < 1, β <= 0, γ < 0, ε out of range.
    """
    beta, eps = _check_beta(beta), _check_smoothing(label_smoothing)
    if not float(gamma) >= 0.0:
        raise ValueError(f"gamma (simpo_gamma) must be >= 0, got {gamma}")
    pc, pr = _pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    lc, lr = _lengths("chosen_lengths", chosen_lengths, pc), _lengths("rejected_lengths", rejected_lengths, pc)
    z = beta * (pc / lc - pr / lr) - float(gamma)
    loss = -F.logsigmoid(z)
    return (1.0 - eps) * loss - eps * F.logsigmoid(-z) if eps else loss


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024, "Iterative Reasoning Preference Optimization", the DPO+NLL
    loss): the negative log-likelihood per token of the chosen responses, a token mean over the batch
    (``-Σ_i log π(y_w,i) / Σ_i |y_w,i|``, as TRL's ``sft`` loss term that TRL's RPO recipe,
    ``loss_type=["sigmoid", "sft"]`` with weights ``[1, α]``, adds). The paper writes
    ``L_NLL + α L_DPO`` with the NLL normalised by the sequence length; weighting the NLL instead
    (TRL's ``rpo_alpha``) is the same objective up to the overall scale 1/α.

    Args:
        policy_chosen_logps: float ``[B]`` summed log-probs (nats). chosen_lengths: ``[B]`` tokens (>= 1).

    Returns:
        0-dim float32/float64, nats per token.
    """
    (pc,) = _pairs(policy_chosen_logps=policy_chosen_logps)
    return -pc.sum() / _lengths("chosen_lengths", chosen_lengths, pc).sum()


def implicit_rewards(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                     ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
                     beta: float, chosen_lengths: torch.Tensor | None = None,
                     rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards of DPO (Rafailov et al. 2023, eq. 5 without the partition function):
    ``r = β (log π(y) - log π_ref(y))`` for chosen and rejected, ``[B]`` each, detached.

    Reference-free (``ref_*`` None, SimPO): ``r = β log π(y) / |y|`` (Meng et al. 2024, eq. 4;
    TRL's CPO logs ``β`` times its average log-probs), so the lengths are then required.
    """
    beta = _check_beta(beta)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        pc, pr = _pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
        lc, lr = _lengths("chosen_lengths", chosen_lengths, pc), _lengths("rejected_lengths", rejected_lengths, pc)
        return (beta * pc / lc).detach(), (beta * pr / lr).detach()
    pc, pr, rc, rr = _pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def preference_loss(loss_type: str, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                    chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
                    *, beta: float = 0.1, label_smoothing: float = 0.0, rpo_alpha: float = 1.0,
                    simpo_gamma: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO-family loss named ``loss_type`` (see the module table), mean over the B pairs, and
    its metrics.

    Args:
        loss_type: one of ``PREFERENCE_LOSSES``: sigmoid | robust | ipo | rpo | simpo.
        policy_chosen_logps, policy_rejected_logps: float ``[B]`` summed response log-probs (nats),
            with grad.
        ref_chosen_logps, ref_rejected_logps: float ``[B]`` under the reference (constants; not used,
            and may be None, for simpo).
        chosen_lengths, rejected_lengths: ``[B]`` response tokens; required by ipo, rpo, simpo.
        beta: β > 0 (IPO's τ).
        label_smoothing: ε in ``[0, 0.5)`` for sigmoid / rpo (cDPO), robust and simpo; must be 0 for ipo.
        rpo_alpha: α >= 0, the weight of RPO's NLL term (rpo only).
        simpo_gamma: SimPO's margin γ >= 0 (simpo only).

    Returns:
        ``(loss, metrics)``: 0-dim loss with grad; detached 0-dim metrics named as TRL logs them:
        ``rewards/chosen``, ``rewards/rejected`` (mean implicit rewards, :func:`implicit_rewards`),
        ``rewards/margins`` (their mean difference), ``rewards/accuracies`` (fraction of pairs with
        chosen reward > rejected; ties count as wrong), ``logps/chosen``, ``logps/rejected`` (mean
        summed log-probs), and ``nll`` for rpo.

    Raises:
        ValueError: unknown ``loss_type``; a reference-based loss without ``ref_*``; missing lengths;
            ``label_smoothing`` with ipo; any argument error of the loss functions.
        TypeError: non-float log-probs.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type must be one of {list(PREFERENCE_LOSSES)}, got {loss_type!r}")
    reference_free = loss_type in REFERENCE_FREE_LOSSES
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type={loss_type!r} needs the reference log-probs ref_chosen_logps / ref_rejected_logps")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError(f"label_smoothing={label_smoothing} has no meaning for loss_type='ipo' (set it to 0)")
    extra: dict[str, torch.Tensor] = {}
    if loss_type in ("sigmoid", "rpo"):
        losses = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          beta, label_smoothing)
    elif loss_type == "robust":
        losses = robust_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                 beta, label_smoothing)
    elif loss_type == "ipo":
        losses = ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          chosen_lengths, rejected_lengths, beta)
    else:
        losses = simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta,
                            simpo_gamma, label_smoothing)
    loss = losses.mean()
    if loss_type == "rpo":
        if not float(rpo_alpha) >= 0.0:
            raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
        nll = chosen_nll(policy_chosen_logps, chosen_lengths)
        loss = loss + float(rpo_alpha) * nll
        extra["nll"] = nll.detach()
    rc, rr = implicit_rewards(policy_chosen_logps, policy_rejected_logps,
                              None if reference_free else ref_chosen_logps,
                              None if reference_free else ref_rejected_logps,
                              beta, chosen_lengths, rejected_lengths)
    metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
               "rewards/accuracies": (rc > rr).to(rc.dtype).mean(),
               "logps/chosen": _upcast(policy_chosen_logps).detach().mean(),
               "logps/rejected": _upcast(policy_rejected_logps).detach().mean(), **extra}
    return loss, metrics


__all__ = ["PREFERENCE_LOSSES", "REFERENCE_FREE_LOSSES", "chosen_nll", "dpo_logits", "dpo_loss", "implicit_rewards",
           "ipo_loss", "preference_loss", "robust_dpo_loss", "simpo_loss"]
