/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The "mem" driver of the fuzz harnesses: a disk of FUZZ_MEM_SIZE bytes in
 * memory.  Which sector a request starts at decides how it ends, so that
 * inputs reach every path of the code above it: sec % 61 == 7 fails with
 * EIO, sec % 5 == 0 completes inside the call that queued it, anything
 * else completes from the loop (out of order).  The spec's path is
 * ignored: every "mem:" image is a new, zeroed disk.
 */
#ifndef TDR_FUZZ_MEM_H
#define TDR_FUZZ_MEM_H

#include "tdr/image.h"

#define FUZZ_MEM_SIZE (1u << 20)

extern const struct td_driver fuzz_mem_driver;

#endif
