"""Token-level cross-entropy for language models.

``cross_entropy`` follows ``torch.nn.functional.cross_entropy`` (class weights,
ignore_index, label smoothing, class-probability targets, reductions) and adds the PaLM
z-loss; ``causal_lm_loss`` applies it to
next-token prediction. Validation, masking, the per-token formula and the reductions are
``_common``'s, shared with the fused loss, the metrics and ``sequence_log_probs``.
"""
from __future__ import annotations

from typing import Any

import jax

from jaxopt_llm.losses._common import sequence_targets, token_cross_entropy


def cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    weight: jax.typing.ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    where: jax.typing.ArrayLike | None = None,
    validate: bool = False,
) -> jax.Array:
  r"""Softmax cross-entropy: class weights, ignore_index, smoothing, soft targets, z-loss.

  For a token with logits ``z`` (``V`` classes), label ``y``,
  ``lse = log sum_c exp(z_c)`` and class weights ``w`` (``weight``; all 1 if None)::

    nll    = lse - z_y                                  # = -log softmax(z)_y
    smooth = sum_c w_c * (lse - z_c) / V                # = mean_c(-w_c log softmax(z)_c)
    loss   = (1 - eps) * w_y * nll + eps * smooth + z_loss * lse**2

  with ``eps = label_smoothing``. The first two terms are exactly
  ``torch.nn.functional.cross_entropy(..., weight=w, label_smoothing=eps)`` (the smoothed
  target puts ``eps / V`` on every class, the label included, and torch weights the
  smoothing term by every class's weight too). The last term is the auxiliary z-loss of
  PaLM (Chowdhery et al., 2022, "PaLM: Scaling Language Modeling with Pathways",
  sec. 5), which keeps the softmax normaliser near 1 (``lse`` near 0); it is not weighted.

  **Soft targets.** Floating ``labels`` of the logits' shape ``[..., V]`` are class
  probabilities ``q`` (as torch accepts; told from class indices by dtype, never by
  shape: floating labels of another shape raise). Then, with torch's smoothed targets
  ``q' = q (1 - eps) + eps / V``::

    loss = -sum_c w_c q'_c log softmax(z)_c + z_loss * lse**2

  computed from a stable log-softmax (``-log p_c = log sum exp(z - m) + (m - z_c)``, two
  non-negative terms). ``q`` need not sum to 1 (not checked, as in torch); a class with
  ``w_c q_c = 0`` adds exactly 0 even at a ``-inf`` logit (torch: NaN). Gradients flow to
  ``logits``, ``labels`` and ``weight``. ``ignore_index`` does not apply: a negative one
  (the default) is ignored and one ``>= 0`` raises, as in torch; mask tokens with
  ``where``.

  Numerics (``_common.softmax_nll``):

  * Tiny losses keep their relative precision: ``nll`` is computed as
    ``log1p(sum_{c != y} exp(z_c - m) / exp(z_y - m))`` near the max ``m`` (and as the
    non-negative sum ``(m - z_y) + log sum_c exp(z_c - m)`` elsewhere), never as
    ``lse - z_y``, which keeps only the rounding of ``lse``. Logits ``[100, 88, 87]``,
    label 0: 8.4045e-6 (exact 8.40451e-6; ``lse - z_y`` gives 7.63e-6, torch 8.46e-6).
    The gradient is ``softmax(z) - onehot(y)``, its label entry computed without the
    cancellation of ``p_y - 1``.
  * The math runs in at least float32: bf16/fp16 logits are upcast, float64 logits
    (under ``jax_enable_x64``) stay float64.
  * Large logits: the loss may overflow to ``+inf`` when its true value exceeds the
    float32 range (e.g. bf16 logits at ``+-3.39e38``: ``m - z_y`` is 6.8e38), but it is
    never NaN, and the gradient stays finite: its entries are bounded by
    ``1 + eps + 2 * z_loss * |lse|`` (6.8e34 at ``z_loss=1e-4``) for ``jax.grad`` of
    the ``"mean"`` or ``"sum"`` loss (a cotangent of at most 1 per token; with
    ``weight``, the first two terms scale with the largest class weight). Where a
    per-token loss overflows, the gradient w.r.t. ``weight`` (made of the per-token
    losses) and, for soft targets near float32's maximum, the one w.r.t. ``logits``
    (``(sum_c w_c q'_c) softmax(z) - w q'``) are themselves beyond float32: inf or NaN.
  * Class weights and ``"mean"``: the weights are first scaled by the power of two that
    puts the largest in [0.5, 1) (exact: nothing is rounded, the weighted mean is the
    same), so weights up to float32's maximum give the finite mean, not ``inf / inf``.
    Weights below float32's smallest normal (1.2e-38) are flushed to 0 by XLA like any
    subnormal float: they count as 0 (all of them: the mean is 0.0).

  A token counts when ``label != ignore_index`` and ``where`` is True there (soft
  targets: where ``where`` is True). Tokens that do not count get loss 0 and exactly
  zero gradient, even if their logits (or target probabilities) are inf or NaN.
  Reductions:

  * ``"mean"``: sum over counted tokens / number of counted tokens (PyTorch's
    ``reduction="mean"`` with ``ignore_index``); with ``weight`` and integer labels,
    sum / ``sum_{counted} w_y``, torch's weighted mean (the smoothing term too). Soft
    targets divide by the number of counted tokens even with ``weight`` (torch's rule).
  * ``"sum"``: sum over counted tokens.
  * ``"none"``: per-token losses of shape ``labels.shape`` (soft targets:
    ``labels.shape[:-1]``), 0 where not counted.

  Deliberate differences from PyTorch: when no token counts, ``"mean"`` returns 0.0 with
  zero gradient (PyTorch returns NaN), so a fully padded micro-batch does not poison the
  accumulated gradient; the same for a weighted mean whose weight sum is 0 (only
  zero-weight targets; PyTorch: NaN or inf). A zero class weight gives its term exactly 0
  even where its ``-log p`` is infinite (PyTorch: NaN). Negative class weights, which
  PyTorch accepts, raise (see ``weight`` below).

  The gradient w.r.t. ``z`` of a counted token (no smoothing, no z-loss) is
  ``softmax(z) - onehot(y)``.

  Bad input:
    * ``reduction`` not in {"mean", "sum", "none"}, ``label_smoothing`` outside
      [0, 1], ``z_loss < 0``, non-floating ``logits``, ``labels`` neither integer of
      shape ``logits.shape[:-1]`` nor floating of shape ``logits.shape``, ``weight``
      not a real array of shape ``(V,)``, and ``ignore_index >= 0`` with soft targets
      raise ``ValueError`` naming the argument.
    * A concrete ``weight`` with a negative or non-finite entry raises ``ValueError``
      naming ``weight``: a negative class weight makes the loss unbounded below (and
      its terms could overflow to ``inf - inf``); a traced ``weight`` is not checked.
    * A string or other non-number for ``label_smoothing`` / ``z_loss`` raises
      ``TypeError``, a non-scalar or a non-bool ``validate`` ``ValueError``, each naming
      the argument; ``logits`` with ``V = 0`` classes raise ``ValueError``.
    * A counted label outside ``[0, V)``: in an eager call (``labels`` concrete) this
      always raises ``ValueError`` naming ``labels``, the bad value(s) and ``V``. Under
      ``jit`` the values are unknown at trace time: with ``validate=True`` a
      ``jax.experimental.checkify`` check is emitted, so wrap the function as
      ``checkify.checkify(jax.jit(f))`` and call ``err.throw()`` (staging a
      ``validate=True`` call without ``checkify`` is an error from JAX itself). With
      ``validate=False`` that token's loss is NaN (and so is a mean/sum over it) and
      so is the gradient of its row of logits, never a silently wrong finite value or
      a silent zero gradient: the gather never clamps or wraps, and a guard that
      checks the loss or the gradients for NaN fires.
    * If ``where`` is traced but ``labels`` concrete, the label check is the traced
      one, since which tokens count is not known eagerly.

  Args:
    logits: ``[..., V]`` unnormalised scores, any floating dtype.
    labels: ``[...]`` integer class indices, or ``[..., V]`` floating class
      probabilities (soft targets).
    weight: optional ``[V]`` per-class weights (>= 0), torch's ``weight``.
    ignore_index: label value that marks a token as not counted (integer labels).
    label_smoothing: ``eps`` in [0, 1].
    z_loss: weight (>= 0) of the PaLM z-loss ``lse**2``.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    where: optional boolean (or integer 0/1) array of ``labels.shape``; False is
      treated exactly like ``ignore_index``.
    validate: emit a checkify check for out-of-range labels when traced.

  Returns:
    A scalar, or the token shape for ``reduction="none"``; float32 (float64 for
    float64 inputs). No counted token (including an empty batch): 0.0, zero gradient.
  """
  return token_cross_entropy(
      "cross_entropy", "labels", logits, labels, weight=weight, ignore_index=ignore_index,
      label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, where=where,
      validate=validate, allow_soft=True)


def causal_lm_loss(logits: jax.typing.ArrayLike, input_ids: jax.typing.ArrayLike,
                   **kwargs: Any) -> jax.Array:
  r"""Next-token cross-entropy: position ``t`` predicts token ``t + 1``.

  Equivalent to ``cross_entropy(logits[..., :-1, :], input_ids[..., 1:], **kwargs)``.
  If ``where`` is given it must have ``input_ids``' shape and is shifted the same way
  (``where[..., 1:]``): a target counts when *its* token is valid, so passing a
  padding mask as ``where`` drops every prediction of a pad token. With ``T == 1``
  there is no target and the mean is 0.0.

  Args:
    logits: ``[..., T, V]`` scores, one row per position.
    input_ids: ``[..., T]`` integer tokens.
    **kwargs: keyword arguments of :func:`cross_entropy` (``weight``,
      ``ignore_index``, ``label_smoothing``, ``z_loss``, ``reduction``, ``where``,
      ``validate``); ``input_ids`` are always class indices (no soft targets).

  Returns:
    As :func:`cross_entropy`; ``reduction="none"`` gives shape ``[..., T - 1]``.
  """
  owner = "causal_lm_loss"
  logits, labels, where = sequence_targets(
      owner, logits, input_ids, kwargs.pop("where", None), labels_name="input_ids",
      shift=True)
  # cross_entropy's own defaults, so the two functions cannot drift apart.
  params = {k: v for k, v in cross_entropy.__kwdefaults__.items() if k != "where"}
  unknown = set(kwargs) - set(params)
  if unknown:
    raise TypeError(f"{owner}: unexpected keyword argument(s) {sorted(unknown)}")
  params.update(kwargs)
  return token_cross_entropy(owner, "input_ids", logits, labels, where=where, **params)
