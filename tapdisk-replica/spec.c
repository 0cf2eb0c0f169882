/* SPDX-License-Identifier: BSD-3-Clause */
/* Parsing of disk specs ("type:params|type:params") and option strings. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tdr/image.h"
#include "tdr/log.h"

int td_spec_split_entry(const char *entry, char *type, size_t typelen, const char **params)
{
	const char *colon = strchr(entry, ':');
	size_t n;

	if (!colon) {
		tdr_set_error("'%s' is not a disk spec; write TYPE:PARAMS, e.g. aio:/path/disk.img (types: %s)",
			      entry, td_driver_names());
		return -EINVAL;
	}
	n = (size_t)(colon - entry);
	if (n == 0 || n >= typelen) {
		tdr_set_error("'%s' has no valid image type before ':'; write TYPE:PARAMS (types: %s)",
			      entry, td_driver_names());
		return -EINVAL;
	}
	memcpy(type, entry, n);
	type[n] = '\0';
	*params = colon + 1;
	return 0;
}

int td_parse_options(const char *opts, int (*cb)(const char *key, const char *value, void *arg),
		     void *arg)
{
	char *copy, *save = NULL, *tok;
	int r = 0;

	if (!opts || !*opts)
		return 0;
	copy = strdup(opts);
	if (!copy)
		return -ENOMEM;
	for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '=');

		if (eq)
			*eq = '\0';
		r = cb(tok, eq ? eq + 1 : "", arg);
		if (r)
			break;
	}
	free(copy);
	return r;
}
