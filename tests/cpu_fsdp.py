"""Runs a training script under accelerate's FSDP on CPU processes (gloo), for the tests:

    accelerate launch --config_file training/configs/accelerate_fsdp_2gpu.yaml --num_processes 2 \
        tests/cpu_fsdp.py training/train_tokenizer.py --cpu true ...

accelerate (1.15) applies a launch config's FSDP settings only to processes on an accelerator: CPU processes
(`DistributedType.MULTI_CPU`) silently train as DDP. torch's FSDP2 itself (`fully_shard`, DTensor parameters, sharded
`torch.distributed.checkpoint` files) runs on CPU over gloo, so this wrapper makes accelerate take its FSDP path there
exactly as it does on GPUs, then runs the script unchanged. The training code does not know it is tested.
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

accelerator_state_init = AcceleratorState.__init__


def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # What AcceleratorState.__init__ does for GPU processes with an FSDP plugin.
        if self.mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self.mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    AcceleratorState.__init__ = init_with_fsdp_on_cpu
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
