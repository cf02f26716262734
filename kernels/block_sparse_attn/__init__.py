"""Block-sparse flash attention forward (Triton) with an fp32 reference."""
