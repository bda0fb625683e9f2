"""cyb_jax: language models that set their own pace with Catch Your Breath losses.

Shape suffixes used throughout the package:

    B  batch
    L  sequence length in real tokens
    W  pause window: slots per real token (step 0 reads the token, step i reads <pause_i>)
    S  flattened slots, L * W
    D  model width
    H  attention heads
    K  head dimension
    F  MLP hidden width
    V  vocabulary (real tokens; the model's output adds one don't-know entry)

A tensor named `logits_BxLxWxV` has those four axes in that order.
"""
