"""Model and data sizes shared by the grid files of this folder."""

# A 2-layer, 64-wide model (about 0.2M parameters) on 32-token sequences, batch 16.
TINY = {
    "model.num_layers": 2,
    "model.d_model": 64,
    "model.num_heads": 4,
    "model.mlp_dim": 192,
    "data.seq_len": 32,
    "data.batch_size": 16,
    "data.eval_max_batches": 20,
    "checkpoint_every": 50,
    "log_every": 25,
}
