"""jaxlm.collectives: collective bytes per device per step, read from compiled HLO."""

import jax

from conftest import load_config
from jaxlm import collectives
from jaxlm import mesh as mesh_lib
from jaxlm import plan as plan_lib

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
                 'collective-permute': 128, 'all-to-all': 64}


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
