//! NF4 storage (bitsandbytes-exact) and the frozen-linear op.
