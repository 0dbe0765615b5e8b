// heapprof: what each block of the GC heap holds, for the footprint tool (tools/board/heapprof.py).
//
// Built into the emulated board's image only (tools/board/image.py, USER_C_MODULES); a board never runs
// it. MicroPython's own `micropython.mem_info(1)` prints a letter per block (T tuple, B function …); this
// prints one line per allocation with its size and, where the object says it, its name: the function's
// name and module, the class of an instance, a module's name. Tables an object owns (a dict's or an
// instance's hash table, a list's items, a bytearray's bytes) are allocations of their own without a
// header, so their owner prints an `O` line naming them, and the Python side attributes them.
//
//   H <offset> <bytes> <kind> [<name> [<module>]]     an allocation (offset from the heap's start, hex);
//                                                     <module>: a function's, a class's, an instance's
//   O <offset> <kind> [<name>]                         the allocation at <offset> is <name>'s <kind>
//   W <word> <word> …                                  (dump(True)) the words of the H line above
//
// Nothing is allocated while printing (the figures are those of the heap as it was).

#include <string.h>

#include "py/bc.h"
#include "py/gc.h"
#include "py/mpstate.h"
#include "py/objarray.h"
#include "py/objfun.h"
#include "py/objlist.h"
#include "py/objtype.h"
#include "py/qstr.h"
#include "py/runtime.h"

#if MICROPY_ENABLE_GC

// gc.c's allocation table: 2 bits a block (these are private to gc.c, and stable across versions)
#define HP_AT_HEAD (1)
#define HP_AT_TAIL (2)
#define HP_KIND(area, b) (((area)->gc_alloc_table_start[(b) / 4] >> (2 * ((b) & 3))) & 3)

// a generator's layout (objgenerator.c keeps its struct private)
typedef struct {
    mp_obj_base_t base;
    mp_obj_t pend_exc;
    mp_code_state_t code_state;
} hp_gen_t;

extern char __executable_start, _end;  // the executable's image: where static type objects live

static mp_state_mem_area_t *hp_area;

static size_t hp_off(const void *p) {
    return (size_t)((const byte *)p - hp_area->gc_pool_start);
}

static bool hp_in_heap(const void *p) {
    return (const byte *)p >= hp_area->gc_pool_start && (const byte *)p < hp_area->gc_pool_end;
}

static const char *hp_module_name(const mp_obj_dict_t *globals) {
    mp_map_elem_t *e = mp_map_lookup((mp_map_t *)&globals->map, MP_OBJ_NEW_QSTR(MP_QSTR___name__), MP_MAP_LOOKUP);
    return e != NULL && mp_obj_is_str(e->value) ? mp_obj_str_get_str(e->value) : "?";
}

// the module a class was defined in: the compiler stores `__module__` in every class body
static const char *hp_class_module(const mp_obj_type_t *ty) {
    if (!MP_OBJ_TYPE_HAS_SLOT(ty, locals_dict)) {
        return "?";
    }
    const mp_obj_dict_t *d = MP_OBJ_TYPE_GET_SLOT(ty, locals_dict);
    mp_map_elem_t *e = mp_map_lookup((mp_map_t *)&d->map, MP_OBJ_NEW_QSTR(MP_QSTR___module__), MP_MAP_LOOKUP);
    return e != NULL && mp_obj_is_str(e->value) ? mp_obj_str_get_str(e->value) : "?";
}

static void hp_owned(const void *table, const char *kind, qstr name, const char *sname) {
    if (table != NULL && hp_in_heap(table)) {
        if (sname != NULL) {
            mp_printf(&mp_plat_print, "O %x %s %s\n", (uint)hp_off(table), kind, sname);
        } else {
            mp_printf(&mp_plat_print, "O %x %s %q\n", (uint)hp_off(table), kind, name);
        }
    }
}

static const char *hp_qstr_kind(const void *p) {
    for (const qstr_pool_t *pool = MP_STATE_VM(last_pool); pool != NULL; pool = pool->prev) {
        if ((const void *)pool == p) {
            return "qstrpool";
        }
        for (size_t i = 0; i < pool->len; i++) {
            if ((const void *)pool->qstrs[i] == p) {
                return "qstrdata";
            }
        }
    }
    return "raw";
}

static void hp_one(void *p, size_t n) {
    const mp_print_t *pr = &mp_plat_print;
    size_t off = hp_off(p);
    const mp_obj_type_t *t = *(const mp_obj_type_t **)p;
    if (t == &mp_type_fun_bc) {
        const mp_obj_fun_bc_t *f = p;
        mp_printf(pr, "H %x %u fun %q %s\n", (uint)off, (uint)n, mp_obj_fun_bc_get_name(f), hp_module_name(f->context->module.globals));
    } else if (t == &mp_type_type) {
        const mp_obj_type_t *ty = p;
        mp_printf(pr, "H %x %u type %q %s\n", (uint)off, (uint)n, ty->name, hp_class_module(ty));
        if (MP_OBJ_TYPE_HAS_SLOT(ty, locals_dict)) {
            const mp_obj_dict_t *d = MP_OBJ_TYPE_GET_SLOT(ty, locals_dict);
            hp_owned(d, "classdict", ty->name, NULL);
            hp_owned(d->map.table, "classtable", ty->name, NULL);
        }
    } else if (t == &mp_type_module) {
        const mp_obj_module_t *m = p;
        const char *name = hp_module_name(m->globals);
        mp_printf(pr, "H %x %u module %s\n", (uint)off, (uint)n, name);
        hp_owned(m->globals, "globdict", 0, name);
        hp_owned(m->globals->map.table, "globtable", 0, name);
    } else if (t == &mp_type_dict) {
        const mp_obj_dict_t *d = p;
        mp_printf(pr, "H %x %u dict\n", (uint)off, (uint)n);
        hp_owned(d->map.table, "dicttable", 0, "");
    } else if (hp_in_heap(t) && t->base.type == &mp_type_type) {
        const mp_obj_instance_t *o = p;
        mp_printf(pr, "H %x %u inst %q %s\n", (uint)off, (uint)n, t->name, hp_class_module(t));
        hp_owned(o->members.table, "members", t->name, NULL);
    } else if (t == &mp_type_gen_instance) {
        const hp_gen_t *g = p;
        mp_printf(pr, "H %x %u gen %q %s\n", (uint)off, (uint)n, mp_obj_fun_bc_get_name(g->code_state.fun_bc),
            hp_module_name(g->code_state.fun_bc->context->module.globals));
    } else if ((const char *)t >= &__executable_start && (const char *)t < &_end && ((uintptr_t)t & 3) == 0
               && t->base.type == &mp_type_type) {
        mp_printf(pr, "H %x %u %q\n", (uint)off, (uint)n, t->name);
        if (t == &mp_type_list) {
            hp_owned(((const mp_obj_list_t *)p)->items, "items", MP_QSTR_list, NULL);
        } else if (t == &mp_type_bytearray || t == &mp_type_array) {  // a memoryview only points into one
            hp_owned(((const mp_obj_array_t *)p)->items, "items", t->name, NULL);
        }
    } else {
        mp_printf(pr, "H %x %u %s\n", (uint)off, (uint)n, hp_qstr_kind(p));
    }
}

// heapprof.dump(words=False): a line per allocation of the heap (see above), between "heapprof begin
// <block size> <heap address>" and "heapprof end"; with `words`, each H line is followed by a W line: the
// allocation's words in hex (the pointers among them say what holds what)
static mp_obj_t heapprof_dump(size_t n_args, const mp_obj_t *args) {
    bool words = n_args > 0 && mp_obj_is_true(args[0]);
    gc_collect();
    mp_printf(&mp_plat_print, "heapprof begin %u %x\n", (uint)MICROPY_BYTES_PER_GC_BLOCK,
        (uint)(uintptr_t)MP_STATE_MEM(area).gc_pool_start);
    for (hp_area = &MP_STATE_MEM(area); hp_area != NULL;) {
        size_t blocks = hp_area->gc_alloc_table_byte_len * 4;
        for (size_t b = 0; b < blocks; b++) {
            if (HP_KIND(hp_area, b) != HP_AT_HEAD) {
                continue;
            }
            size_t n = 1;
            while (b + n < blocks && HP_KIND(hp_area, b + n) == HP_AT_TAIL) {
                n++;
            }
            void *p = hp_area->gc_pool_start + b * MICROPY_BYTES_PER_GC_BLOCK;
            hp_one(p, n * MICROPY_BYTES_PER_GC_BLOCK);
            if (words) {  // what it points to is found from these, as the GC finds it (tools/board/heapprof.py)
                mp_printf(&mp_plat_print, "W");
                for (size_t i = 0; i < n * MICROPY_BYTES_PER_GC_BLOCK / sizeof(uintptr_t); i++) {
                    mp_printf(&mp_plat_print, " %x", (uint)((uintptr_t *)p)[i]);
                }
                mp_printf(&mp_plat_print, "\n");
            }
        }
        #if MICROPY_GC_SPLIT_HEAP
        hp_area = hp_area->next;
        #else
        hp_area = NULL;
        #endif
    }
    mp_printf(&mp_plat_print, "heapprof end\n");
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_VAR_BETWEEN(heapprof_dump_obj, 0, 1, heapprof_dump);

static const mp_rom_map_elem_t heapprof_globals_table[] = {
    { MP_ROM_QSTR(MP_QSTR___name__), MP_ROM_QSTR(MP_QSTR_heapprof) },
    { MP_ROM_QSTR(MP_QSTR_dump), MP_ROM_PTR(&heapprof_dump_obj) },
};
static MP_DEFINE_CONST_DICT(heapprof_globals, heapprof_globals_table);

const mp_obj_module_t heapprof_module = {
    .base = { &mp_type_module },
    .globals = (mp_obj_dict_t *)&heapprof_globals,
};

MP_REGISTER_MODULE(MP_QSTR_heapprof, heapprof_module);

#endif
