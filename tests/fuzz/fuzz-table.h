/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The driver table of a fuzz harness: the one driver it sets in
 * fuzz_driver (fuzz-table.c replaces driver-table.c, so that a harness
 * links only the drivers it fuzzes).
 */
#ifndef TDR_FUZZ_TABLE_H
#define TDR_FUZZ_TABLE_H

#include "tdr/image.h"

extern const struct td_driver *fuzz_driver;

#endif
