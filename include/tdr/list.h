/* SPDX-License-Identifier: BSD-3-Clause */
/* A minimal intrusive doubly linked list, in the style of the Linux kernel. */
#ifndef TDR_LIST_H
#define TDR_LIST_H

#include <stddef.h>
#include <stdbool.h>

struct tdr_list {
	struct tdr_list *next, *prev;
};

#define TDR_LIST_INIT(name) { &(name), &(name) }

static inline void tdr_list_init(struct tdr_list *l)
{
	l->next = l->prev = l;
}

static inline bool tdr_list_empty(const struct tdr_list *l)
{
	return l->next == l;
}

static inline void tdr_list_add_tail(struct tdr_list *n, struct tdr_list *head)
{
	n->prev = head->prev;
	n->next = head;
	head->prev->next = n;
	head->prev = n;
}

static inline void tdr_list_add(struct tdr_list *n, struct tdr_list *head)
{
	n->next = head->next;
	n->prev = head;
	head->next->prev = n;
	head->next = n;
}

static inline void tdr_list_del(struct tdr_list *n)
{
	n->prev->next = n->next;
	n->next->prev = n->prev;
	n->next = n->prev = n;
}

#define tdr_container_of(ptr, type, member) \
	((type *)(void *)((char *)(ptr) - offsetof(type, member)))

#define tdr_list_entry(ptr, type, member) tdr_container_of(ptr, type, member)

#define tdr_list_first(head, type, member) \
	(tdr_list_empty(head) ? NULL : tdr_list_entry((head)->next, type, member))

#define tdr_list_for_each(pos, head) \
	for ((pos) = (head)->next; (pos) != (head); (pos) = (pos)->next)

/* Safe against removal of the current entry. */
#define tdr_list_for_each_safe(pos, tmp, head) \
	for ((pos) = (head)->next, (tmp) = (pos)->next; (pos) != (head); \
	     (pos) = (tmp), (tmp) = (pos)->next)

#endif
