"""Everything DeepSpeed touches: launch environment (launch), engine construction (build), the sharded
fp32 EMA (ema), checkpoints and resume (checkpoint), preemption signals (signals), training metrics
(metrics), what each rank holds (memory) and weight export (export: `python -m ditscale.engine.export`)."""
