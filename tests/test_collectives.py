"""jaxlm.cli.collectives: collective bytes per device per step, read from compiled HLO."""

import jax

from conftest import load_config
from jaxlm.cli import collectives
from jaxlm.cli import plan as plan_lib
from jaxlm.core import mesh as mesh_lib

HLO = '''HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = f32[64]{0} all-gather(%x), dimensions={0}
  %ars = f32[64]{0} all-reduce-start(%ag), to_apply=%add
  %ard = f32[64]{0} all-reduce-done(%ars)
  ROOT %t = (s32[], f32[8]) tuple(%i, %x)
}

ENTRY %main (a: bf16[4,8]) -> bf16[4,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %rs = bf16[1,8]{1,0} reduce-scatter(%a), dimensions={0}
  %cp = (bf16[4,8]{1,0}, bf16[4,8]{1,0}) collective-permute(%a, %a)
  ROOT %a2a = bf16[4,8]{1,0} all-to-all(%a), dimensions={0}
}
'''


def test_loops_multiply_async_pairs_count_once_tuples_add_up():
  got = collectives.collective_bytes(HLO)
  assert got == {'all-gather': 5 * 64 * 4, 'all-reduce': 5 * 64 * 4, 'reduce-scatter': 16,
                 'collective-permute': 128, 'all-to-all': 64, collectives.DCN: 0}


# As libtpu writes a multislice step: a collective that crosses DCN is a MegaScale send/recv.
MULTISLICE = '''HloModule m, num_partitions=256

%body (p: (s32[], bf16[2,64])) -> (s32[], bf16[2,64]) {
  %p = (s32[], bf16[2,64]) parameter(0)
  %x = bf16[2,64]{1,0} get-tuple-element(%p), index=1
  %s = (bf16[2,64]{1,0}, u32[], token[]) send(%x, %tok), channel_id=10, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="collective-permute.24_0",_xla_megascale_target={{100000->200000}}}
  %r = (bf16[2,64]{1,0}, u32[], token[]) recv(%tok), channel_id=9, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="collective-permute.24_0",_xla_megascale_target={{100000->200000}}}
  %rd = (bf16[2,64]{1,0}, token[]) recv-done(%r), channel_id=9, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime"}
  %ag = f32[16]{0} all-gather(%y), dimensions={0}
  ROOT %t = (s32[], bf16[2,64]) tuple(%i, %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], bf16[2,64]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  %r2 = (f32[8]{0}, u32[], token[]) recv(%tok), channel_id=11, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.143_0",_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %o = f32[8]{0} copy(%a)
}
'''


def test_collectives_across_slices_count_from_their_megascale_recvs():
  got = collectives.collective_bytes(MULTISLICE)
  assert got['collective-permute'] == 7 * 2 * 64 * 2  # the pipeline rotation, once per iteration
  assert got['all-reduce'] == 8 * 4
  assert got['all-gather'] == 7 * 16 * 4  # inside the slice
  assert got[collectives.DCN] == 7 * 2 * 64 * 2 + 8 * 4


def test_fsdp_gathers_once_per_micro_batch_in_a_compiled_step():
  got = {}
  for ga in (1, 2):
    cfg = load_config('tiny')
    cfg.mesh.data, cfg.mesh.fsdp, cfg.train.grad_accum, cfg.train.batch_size = 1, 8, ga, 16
    got[ga] = plan_lib.figures(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:8]))
  assert got[1]['collectives']['all-gather'] > 0
  # Gathers inside the accumulation loop run twice; a few (embedding, head) stay outside it.
  assert 1.6 * got[1]['collectives']['all-gather'] < got[2]['collectives']['all-gather'] \
      <= 2 * got[1]['collectives']['all-gather']
