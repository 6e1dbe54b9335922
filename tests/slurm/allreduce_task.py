"""One task of a cluster check: gloo all-reduce of (rank + 1) over the ranks SLURM started."""

import os

import torch
import torch.distributed as dist

rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world)
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
print(f"rank={rank} world={world} node={os.environ['SLURMD_NODENAME']} sum={total.item():g}", flush=True)
dist.destroy_process_group()
