"""The pseudo-ops: stream records that are not aten ops (docs/PROTOCOL.md, Worker).

The front sends them inside the stream, so they keep their order relative to real ops. The RNG
records name a generator of a program's own (a GeneratorRef) after their other arguments;
without one they are about the device's default generator.
"""
GENERATOR_OP = "moai::generator"              # args [seed]; out: a fresh id for a new generator
SEED_OP = "moai::manual_seed"                 # args [seed, GeneratorRef?]
GET_RNG_STATE_OP = "moai::get_rng_state"      # args [GeneratorRef?]; out: a fresh id for its state
SET_RNG_STATE_OP = "moai::set_rng_state"      # args [RemoteRef(state), GeneratorRef?]
GRAD_MODE_OP = "moai::grad_mode"              # args [enabled]: torch's grad mode for the ops after it
BACKWARD_OP = "moai::backward"                # args [loss, [LeafRef], [grad or None]]; out: grad ids
