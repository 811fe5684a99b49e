"""Personal training: data formats, losses (SFT, DPO), the multi-tenant trainer, jobs."""
