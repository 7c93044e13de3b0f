//! The rows of the command table: every command of Redis 7.0, as data.
//!
//! Rows are grouped by Redis's own command groups and written with the short
//! constructors below, so that each row reads as one line: name, arity, key
//! positions, then only what differs from a plain forwarded command.

use super::{
    Access, BeginSearch, Channels, CommandSpec, FindKeys, Handling, KeySpec, Local as L, Patterns,
    ReplyShape as R, ValueArgs,
};

/// Refusal reason of commands that see or change more than one project.
const OUTSIDE: &str = "reaches outside the project";
/// Refusal reason of commands that manage or inspect the server itself.
const SERVER_ADMIN: &str = "administers the server";
/// Refusal reason of families that later work will wire in (Pub/Sub,
/// scripting, client-side caching).
const LATER: &str = "not supported by this proxy yet";

/// A command that reads project data and is forwarded.
const fn read(name: &'static str, arity: i32, keys: &'static [KeySpec]) -> CommandSpec {
    CommandSpec {
        name,
        arity,
        access: Access::Read,
        keys,
        patterns: Patterns::None,
        values: ValueArgs::None,
        reply: R::Plain,
        handling: Handling::Forward,
        stateful: false,
        subcommands: &[],
    }
}

/// A command that writes project data and is forwarded.
const fn write(name: &'static str, arity: i32, keys: &'static [KeySpec]) -> CommandSpec {
    CommandSpec {
        access: Access::Write,
        ..read(name, arity, keys)
    }
}

/// A command that blocks until data arrives: it writes (it pops) and needs
/// an upstream connection of its own.
const fn blocking(name: &'static str, arity: i32, keys: &'static [KeySpec]) -> CommandSpec {
    write(name, arity, keys).stateful()
}

/// A forwarded command that touches no project data.
const fn conn(name: &'static str, arity: i32) -> CommandSpec {
    CommandSpec {
        access: Access::Connection,
        ..read(name, arity, &[])
    }
}

/// A command the proxy answers itself, open to every user.
const fn local(name: &'static str, arity: i32, what: L) -> CommandSpec {
    CommandSpec {
        handling: Handling::Local(what),
        ..conn(name, arity)
    }
}

/// A project-scoped emulation of a server-wide command, for admin users.
const fn admin(name: &'static str, arity: i32, what: L) -> CommandSpec {
    CommandSpec {
        access: Access::Admin,
        ..local(name, arity, what)
    }
}

/// A command without keys that the proxy refuses.
const fn refused(name: &'static str, arity: i32, reason: &'static str) -> CommandSpec {
    conn(name, arity).refuse(reason)
}

impl CommandSpec {
    /// Refuses the command, keeping its key positions for reference.
    const fn refuse(self, reason: &'static str) -> Self {
        CommandSpec {
            handling: Handling::Refuse(reason),
            ..self
        }
    }

    /// The argument at `index` is a value to seal.
    const fn value(self, index: usize) -> Self {
        CommandSpec {
            values: ValueArgs::Range {
                first: index,
                last: index as isize,
                step: 1,
            },
            ..self
        }
    }

    /// Every `step`-th argument from `first` to the last is a value to seal.
    const fn values(self, first: usize, step: usize) -> Self {
        CommandSpec {
            values: ValueArgs::Range {
                first,
                last: -1,
                step,
            },
            ..self
        }
    }

    const fn reply(self, reply: R) -> Self {
        CommandSpec { reply, ..self }
    }

    const fn patterns(self, patterns: Patterns) -> Self {
        CommandSpec { patterns, ..self }
    }

    const fn stateful(self) -> Self {
        CommandSpec {
            stateful: true,
            ..self
        }
    }

    const fn subs(self, subcommands: &'static [CommandSpec]) -> Self {
        CommandSpec {
            subcommands,
            ..self
        }
    }
}

/// Keys from `begin` to `last_key` (relative to `begin`; negative counts from
/// the end), every `step` arguments.
const fn range(begin: usize, last_key: isize, step: usize) -> KeySpec {
    KeySpec {
        begin: BeginSearch::Index(begin),
        find: FindKeys::Range {
            last_key,
            step,
            limit: 0,
        },
    }
}

/// The argument at `begin` counts the keys, which follow it directly.
const fn numkeys(begin: usize) -> KeySpec {
    KeySpec {
        begin: BeginSearch::Index(begin),
        find: FindKeys::KeyNum {
            key_num_idx: 0,
            first_key: 1,
            step: 1,
        },
    }
}

/// One key right after `keyword`, searched forwards from `start_from`.
const fn after(keyword: &'static str, start_from: isize) -> KeySpec {
    KeySpec {
        begin: BeginSearch::Keyword {
            keyword,
            start_from,
        },
        find: FindKeys::Range {
            last_key: 0,
            step: 1,
            limit: 0,
        },
    }
}

/// After `keyword`, every argument to the end, of which the first
/// `1/limit` are keys (`limit` 0: all of them).
const fn all_after(keyword: &'static str, start_from: isize, limit: usize) -> KeySpec {
    KeySpec {
        begin: BeginSearch::Keyword {
            keyword,
            start_from,
        },
        find: FindKeys::Range {
            last_key: -1,
            step: 1,
            limit,
        },
    }
}

const KEY1: &[KeySpec] = &[range(1, 0, 1)];
/// The key after a subcommand (`OBJECT ENCODING key`).
const KEY2: &[KeySpec] = &[range(2, 0, 1)];
/// Source and destination, as two specifications (`RENAME src dst`).
const KEY1_KEY2: &[KeySpec] = &[range(1, 0, 1), range(2, 0, 1)];
/// Two keys in one specification (`LCS a b`).
const LCS_KEYS: &[KeySpec] = &[range(1, 1, 1)];
const ALL_KEYS: &[KeySpec] = &[range(1, -1, 1)];
const KEY_VALUE_PAIRS: &[KeySpec] = &[range(1, -1, 2)];
/// `BLPOP k1 k2 timeout`.
const KEYS_TIMEOUT: &[KeySpec] = &[range(1, -2, 1)];
/// `SDIFFSTORE dest a b …`.
const DEST_THEN_KEYS: &[KeySpec] = &[range(1, 0, 1), range(2, -1, 1)];
/// `BITOP op dest a b …`.
const BITOP_KEYS: &[KeySpec] = &[range(2, 0, 1), range(3, -1, 1)];
/// `ZDIFF 2 a b`: the count, then the keys.
const NUMKEYS_AT_1: &[KeySpec] = &[numkeys(1)];
/// `BLMPOP timeout 2 a b …`, `EVAL script 2 a b …`.
const NUMKEYS_AT_2: &[KeySpec] = &[numkeys(2)];
/// `ZUNIONSTORE dest 2 a b …`.
const DEST_THEN_NUMKEYS: &[KeySpec] = &[range(1, 0, 1), numkeys(2)];
/// The key, then `STORE`/`STOREDIST` destinations after the fixed arguments.
const GEORADIUS_KEYS: &[KeySpec] = &[range(1, 0, 1), after("STORE", 6), after("STOREDIST", 6)];
const GEORADIUSBYMEMBER_KEYS: &[KeySpec] =
    &[range(1, 0, 1), after("STORE", 5), after("STOREDIST", 5)];
/// `STREAMS k1 k2 id1 id2`: the first half of what follows are keys.
const XREAD_KEYS: &[KeySpec] = &[all_after("STREAMS", 1, 2)];
const XREADGROUP_KEYS: &[KeySpec] = &[all_after("STREAMS", 4, 2)];
/// Redis marks the second specification incomplete: the single-key form
/// names its key at index 3 and ends with an empty `KEYS` list.
const MIGRATE_KEYS: &[KeySpec] = &[range(3, 0, 1), all_after("KEYS", -2, 0)];

/// `KEYS pattern`.
const KEYS_GLOB: Patterns = Patterns::Arg(1);
/// `SCAN cursor [MATCH pattern] …`.
const SCAN_GLOB: Patterns = Patterns::AfterKeyword {
    keyword: "MATCH",
    start_from: 2,
};

/// Every top-level command, family by family, in Redis's command groups.
/// Container commands list their subcommands in the `*_SUBS` tables.
pub(super) static GROUPS: &[&[CommandSpec]] = &[
    STRINGS,
    BITMAPS,
    HASHES,
    LISTS,
    SETS,
    SORTED_SETS,
    STREAMS,
    GEO,
    HYPERLOGLOG,
    KEYSPACE,
    TRANSACTIONS,
    CONNECTION,
    SERVER,
    PUBSUB,
    SCRIPTING,
    CLUSTER,
];

/// Strings. APPEND, SETRANGE, GETRANGE, STRLEN and LCS work on the bytes
/// Redis holds, which are ciphertext when encryption is on: the session
/// must answer them with an error for sealed values rather than seal their
/// arguments, so none are marked as values here. SET's reply holds a value
/// only with its GET option.
const STRINGS: &[CommandSpec] = &[
    write("append", 3, KEY1),
    write("decr", 2, KEY1),
    write("decrby", 3, KEY1),
    read("get", 2, KEY1).reply(R::Value),
    write("getdel", 2, KEY1).reply(R::Value),
    write("getex", -2, KEY1).reply(R::Value),
    read("getrange", 4, KEY1),
    write("getset", 3, KEY1).value(2).reply(R::Value),
    write("incr", 2, KEY1),
    write("incrby", 3, KEY1),
    write("incrbyfloat", 3, KEY1),
    read("lcs", -3, LCS_KEYS),
    read("mget", -2, ALL_KEYS).reply(R::Values),
    write("mset", -3, KEY_VALUE_PAIRS).values(2, 2),
    write("msetnx", -3, KEY_VALUE_PAIRS).values(2, 2),
    write("psetex", 4, KEY1).value(3),
    write("set", -3, KEY1).value(2).reply(R::Value),
    write("setex", 4, KEY1).value(3),
    write("setnx", 3, KEY1).value(2),
    write("setrange", 4, KEY1),
    read("strlen", 2, KEY1),
    read("substr", 4, KEY1),
];

/// Bitmaps: they edit the stored bytes in place, like SETRANGE.
const BITMAPS: &[CommandSpec] = &[
    read("bitcount", -2, KEY1),
    write("bitfield", -2, KEY1),
    read("bitfield_ro", -2, KEY1),
    write("bitop", -4, BITOP_KEYS),
    read("bitpos", -3, KEY1),
    read("getbit", 3, KEY1),
    write("setbit", 4, KEY1),
];

/// Hashes: field values are sealed, field names stay plain.
const HASHES: &[CommandSpec] = &[
    write("hdel", -3, KEY1),
    read("hexists", 3, KEY1),
    read("hget", 3, KEY1).reply(R::Value),
    read("hgetall", 2, KEY1).reply(R::FieldValues),
    write("hincrby", 4, KEY1),
    write("hincrbyfloat", 4, KEY1),
    read("hkeys", 2, KEY1),
    read("hlen", 2, KEY1),
    read("hmget", -3, KEY1).reply(R::Values),
    write("hmset", -4, KEY1).values(3, 2),
    // Field/value pairs only with WITHVALUES; without it, only field names.
    read("hrandfield", -2, KEY1).reply(R::FieldValues),
    read("hscan", -3, KEY1),
    write("hset", -4, KEY1).values(3, 2),
    write("hsetnx", 4, KEY1).value(3),
    read("hstrlen", 3, KEY1),
    read("hvals", 2, KEY1).reply(R::Values),
];

/// Lists. LINSERT, LREM and LPOS compare elements inside Redis, where they
/// are sealed with a random IV: the session refuses them or handles them
/// itself, so their element arguments are not marked as values.
const LISTS: &[CommandSpec] = &[
    blocking("blmove", 6, KEY1_KEY2).reply(R::Value),
    blocking("blmpop", -5, NUMKEYS_AT_2).reply(R::KeyValues),
    blocking("blpop", -3, KEYS_TIMEOUT).reply(R::KeyValue),
    blocking("brpop", -3, KEYS_TIMEOUT).reply(R::KeyValue),
    blocking("brpoplpush", 4, KEY1_KEY2).reply(R::Value),
    read("lindex", 3, KEY1).reply(R::Value),
    write("linsert", 5, KEY1),
    read("llen", 2, KEY1),
    write("lmove", 5, KEY1_KEY2).reply(R::Value),
    write("lmpop", -4, NUMKEYS_AT_1).reply(R::KeyValues),
    write("lpop", -2, KEY1).reply(R::Value),
    read("lpos", -3, KEY1),
    write("lpush", -3, KEY1).values(2, 1),
    write("lpushx", -3, KEY1).values(2, 1),
    read("lrange", 4, KEY1).reply(R::Values),
    write("lrem", 4, KEY1),
    write("lset", 4, KEY1).value(3),
    write("ltrim", 4, KEY1),
    write("rpop", -2, KEY1).reply(R::Value),
    write("rpoplpush", 3, KEY1_KEY2).reply(R::Value),
    write("rpush", -3, KEY1).values(2, 1),
    write("rpushx", -3, KEY1).values(2, 1),
];

/// Sets: members stay plain, since Redis compares them.
const SETS: &[CommandSpec] = &[
    write("sadd", -3, KEY1),
    read("scard", 2, KEY1),
    read("sdiff", -2, ALL_KEYS),
    write("sdiffstore", -3, DEST_THEN_KEYS),
    read("sinter", -2, ALL_KEYS),
    read("sintercard", -3, NUMKEYS_AT_1),
    write("sinterstore", -3, DEST_THEN_KEYS),
    read("sismember", 3, KEY1),
    read("smembers", 2, KEY1),
    read("smismember", -3, KEY1),
    write("smove", 4, KEY1_KEY2),
    write("spop", -2, KEY1),
    read("srandmember", -2, KEY1),
    write("srem", -3, KEY1),
    read("sscan", -3, KEY1),
    read("sunion", -2, ALL_KEYS),
    write("sunionstore", -3, DEST_THEN_KEYS),
];

/// Sorted sets: members stay plain, since Redis orders and compares them.
const SORTED_SETS: &[CommandSpec] = &[
    blocking("bzmpop", -5, NUMKEYS_AT_2).reply(R::KeyFirst),
    blocking("bzpopmax", -3, KEYS_TIMEOUT).reply(R::KeyFirst),
    blocking("bzpopmin", -3, KEYS_TIMEOUT).reply(R::KeyFirst),
    write("zadd", -4, KEY1),
    read("zcard", 2, KEY1),
    read("zcount", 4, KEY1),
    read("zdiff", -3, NUMKEYS_AT_1),
    write("zdiffstore", -4, DEST_THEN_NUMKEYS),
    write("zincrby", 4, KEY1),
    read("zinter", -3, NUMKEYS_AT_1),
    read("zintercard", -3, NUMKEYS_AT_1),
    write("zinterstore", -4, DEST_THEN_NUMKEYS),
    read("zlexcount", 4, KEY1),
    write("zmpop", -4, NUMKEYS_AT_1).reply(R::KeyFirst),
    read("zmscore", -3, KEY1),
    write("zpopmax", -2, KEY1),
    write("zpopmin", -2, KEY1),
    read("zrandmember", -2, KEY1),
    read("zrange", -4, KEY1),
    read("zrangebylex", -4, KEY1),
    read("zrangebyscore", -4, KEY1),
    write("zrangestore", -5, KEY1_KEY2),
    read("zrank", 3, KEY1),
    write("zrem", -3, KEY1),
    write("zremrangebylex", 4, KEY1),
    write("zremrangebyrank", 4, KEY1),
    write("zremrangebyscore", 4, KEY1),
    read("zrevrange", -4, KEY1),
    read("zrevrangebylex", -4, KEY1),
    read("zrevrangebyscore", -4, KEY1),
    read("zrevrank", 3, KEY1),
    read("zscan", -3, KEY1),
    read("zscore", 3, KEY1),
    read("zunion", -3, NUMKEYS_AT_1),
    write("zunionstore", -4, DEST_THEN_NUMKEYS),
];

/// Streams. Entries, group names and consumer names stay plain.
const STREAMS: &[CommandSpec] = &[
    write("xack", -4, KEY1),
    write("xadd", -5, KEY1),
    write("xautoclaim", -6, KEY1),
    write("xclaim", -6, KEY1),
    write("xdel", -3, KEY1),
    conn("xgroup", -2).subs(XGROUP_SUBS),
    conn("xinfo", -2).subs(XINFO_SUBS),
    read("xlen", 2, KEY1),
    read("xpending", -3, KEY1),
    read("xrange", -4, KEY1),
    read("xread", -4, XREAD_KEYS)
        .reply(R::StreamKeys)
        .stateful(),
    // The key specification assumes `GROUP g c` comes first, as documented.
    // Redis also accepts options before GROUP, and then the search from
    // index 4 can stop at a group or consumer named "STREAMS" and name the
    // wrong arguments as keys; the session must refuse that reordered form.
    write("xreadgroup", -7, XREADGROUP_KEYS)
        .reply(R::StreamKeys)
        .stateful(),
    read("xrevrange", -4, KEY1),
    write("xsetid", -3, KEY1),
    write("xtrim", -4, KEY1),
];

/// Geo: members stay plain, as in sorted sets.
const GEO: &[CommandSpec] = &[
    write("geoadd", -5, KEY1),
    read("geodist", -4, KEY1),
    read("geohash", -2, KEY1),
    read("geopos", -2, KEY1),
    // The STORE and STOREDIST specifications each find their first keyword,
    // but Redis stores into the last one given: the session must refuse a
    // repeated STORE/STOREDIST, which would otherwise leave a key unprefixed.
    write("georadius", -6, GEORADIUS_KEYS),
    read("georadius_ro", -6, KEY1),
    write("georadiusbymember", -5, GEORADIUSBYMEMBER_KEYS),
    read("georadiusbymember_ro", -5, KEY1),
    read("geosearch", -7, KEY1),
    write("geosearchstore", -8, KEY1_KEY2),
];

/// HyperLogLog.
const HYPERLOGLOG: &[CommandSpec] = &[
    write("pfadd", -2, KEY1),
    read("pfcount", -2, ALL_KEYS),
    write("pfdebug", 3, KEY2).refuse(SERVER_ADMIN),
    write("pfmerge", -2, DEST_THEN_KEYS),
    refused("pfselftest", 1, SERVER_ADMIN),
];

/// Keyspace. COPY's `DB n` option would reach another database: the session
/// refuses it, since the table can't express an option-dependent refusal.
const KEYSPACE: &[CommandSpec] = &[
    write("copy", -3, KEY1_KEY2),
    write("del", -2, ALL_KEYS),
    read("dump", 2, KEY1),
    read("exists", -2, ALL_KEYS),
    write("expire", -3, KEY1),
    write("expireat", -3, KEY1),
    read("expiretime", 2, KEY1),
    read("keys", 2, &[]).reply(R::Keys).patterns(KEYS_GLOB),
    write("migrate", -6, MIGRATE_KEYS).refuse(OUTSIDE),
    write("move", 3, KEY1).refuse(OUTSIDE),
    conn("object", -2).subs(OBJECT_SUBS),
    write("persist", 2, KEY1),
    write("pexpire", -3, KEY1),
    write("pexpireat", -3, KEY1),
    read("pexpiretime", 2, KEY1),
    read("pttl", 2, KEY1),
    admin("randomkey", 1, L::RandomKey).reply(R::Key),
    write("rename", 3, KEY1_KEY2),
    write("renamenx", 3, KEY1_KEY2),
    write("restore", -4, KEY1),
    read("scan", -2, &[]).reply(R::ScanKeys).patterns(SCAN_GLOB),
    // Redis gives SORT two more key specifications of kind "unknown" (BY/GET
    // patterns and STORE); `Patterns::Sort` stands for both.
    // The reply is the sorted elements, or the values `GET` fetched: sealed
    // ones are opened.
    write("sort", -2, KEY1)
        .patterns(Patterns::Sort)
        .reply(R::Values),
    read("sort_ro", -2, KEY1)
        .patterns(Patterns::Sort)
        .reply(R::Values),
    read("touch", -2, ALL_KEYS),
    read("ttl", 2, KEY1),
    read("type", 2, KEY1),
    write("unlink", -2, ALL_KEYS),
    conn("wait", 3).stateful(),
];

/// Transactions: `MULTI` to `EXEC` needs one upstream connection.
const TRANSACTIONS: &[CommandSpec] = &[
    conn("discard", 1).stateful(),
    conn("exec", 1).stateful(),
    conn("multi", 1).stateful(),
    conn("unwatch", 1).stateful(),
    read("watch", -2, ALL_KEYS).stateful(),
];

/// Connection: answered by the proxy, which owns the client's connection.
const CONNECTION: &[CommandSpec] = &[
    local("auth", -2, L::Auth),
    conn("client", -2).subs(CLIENT_SUBS),
    local("echo", 2, L::Echo),
    local("hello", -1, L::Hello),
    local("ping", -1, L::Ping),
    local("quit", -1, L::Quit),
    local("reset", 1, L::Reset),
    local("select", 2, L::Select),
];

/// Server: project-scoped emulations for admins, refusals otherwise.
const SERVER: &[CommandSpec] = &[
    refused("acl", -2, SERVER_ADMIN).subs(ACL_SUBS),
    refused("bgrewriteaof", 1, SERVER_ADMIN),
    refused("bgsave", -1, SERVER_ADMIN),
    local("command", -1, L::Command).subs(COMMAND_SUBS),
    refused("config", -2, SERVER_ADMIN).subs(CONFIG_SUBS),
    admin("dbsize", 1, L::DbSize),
    refused("debug", -2, SERVER_ADMIN),
    refused("failover", -1, SERVER_ADMIN),
    admin("flushall", -1, L::FlushDb),
    admin("flushdb", -1, L::FlushDb),
    local("info", -1, L::Info),
    refused("lastsave", 1, SERVER_ADMIN),
    refused("latency", -2, SERVER_ADMIN).subs(LATENCY_SUBS),
    refused("lolwut", -1, SERVER_ADMIN),
    conn("memory", -2).subs(MEMORY_SUBS),
    refused("module", -2, SERVER_ADMIN).subs(MODULE_SUBS),
    refused("monitor", 1, OUTSIDE),
    refused("psync", -3, SERVER_ADMIN),
    refused("replconf", -1, SERVER_ADMIN),
    refused("replicaof", 3, SERVER_ADMIN),
    write("restore-asking", -4, KEY1).refuse(SERVER_ADMIN),
    refused("role", 1, SERVER_ADMIN),
    refused("save", 1, SERVER_ADMIN),
    refused("shutdown", -1, SERVER_ADMIN),
    refused("slaveof", 3, SERVER_ADMIN),
    refused("slowlog", -2, SERVER_ADMIN).subs(SLOWLOG_SUBS),
    refused("swapdb", 3, OUTSIDE),
    refused("sync", 1, SERVER_ADMIN),
    conn("time", 1),
];

/// Pub/Sub. Redis describes shard channels (SPUBLISH, SSUBSCRIBE,
/// SUNSUBSCRIBE) with key specifications flagged `not_key`; they are left
/// out, since channels are namespaced as channels, not as keys.
const PUBSUB: &[CommandSpec] = &[
    local("psubscribe", -2, L::Subscribe(Channels::Pattern)).stateful(),
    local("publish", 3, L::Publish(Channels::Global)),
    conn("pubsub", -2).subs(PUBSUB_SUBS),
    local("punsubscribe", -1, L::Unsubscribe(Channels::Pattern)).stateful(),
    local("spublish", 3, L::Publish(Channels::Shard)),
    local("ssubscribe", -2, L::Subscribe(Channels::Shard)).stateful(),
    local("subscribe", -2, L::Subscribe(Channels::Global)).stateful(),
    local("sunsubscribe", -1, L::Unsubscribe(Channels::Shard)).stateful(),
    local("unsubscribe", -1, L::Unsubscribe(Channels::Global)).stateful(),
];

/// Scripting. EVAL, EVALSHA and FCALL may write whatever keys the script
/// names, so they count as writes.
const SCRIPTING: &[CommandSpec] = &[
    // Forwarded only for projects with `allow_scripts`; the session checks.
    write("eval", -3, NUMKEYS_AT_2),
    read("eval_ro", -3, NUMKEYS_AT_2),
    write("evalsha", -3, NUMKEYS_AT_2),
    read("evalsha_ro", -3, NUMKEYS_AT_2),
    write("fcall", -3, NUMKEYS_AT_2),
    read("fcall_ro", -3, NUMKEYS_AT_2),
    refused("function", -2, SERVER_ADMIN).subs(FUNCTION_SUBS),
    refused("script", -2, SERVER_ADMIN).subs(SCRIPT_SUBS),
];

/// Cluster: the proxy presents a single node and routes by itself.
const CLUSTER: &[CommandSpec] = &[
    refused("asking", 1, SERVER_ADMIN),
    refused("cluster", -2, SERVER_ADMIN).subs(CLUSTER_SUBS),
    refused("readonly", 1, SERVER_ADMIN),
    refused("readwrite", 1, SERVER_ADMIN),
];

/// `XGROUP`: consumer groups of one stream.
const XGROUP_SUBS: &[CommandSpec] = &[
    write("create", -5, KEY2),
    write("createconsumer", 5, KEY2),
    write("delconsumer", 5, KEY2),
    write("destroy", 4, KEY2),
    conn("help", 2),
    write("setid", -5, KEY2),
];

/// `XINFO`: introspection of one stream.
const XINFO_SUBS: &[CommandSpec] = &[
    read("consumers", 4, KEY2),
    read("groups", 3, KEY2),
    conn("help", 2),
    read("stream", -3, KEY2),
];

/// `OBJECT`: internals of one key.
const OBJECT_SUBS: &[CommandSpec] = &[
    read("encoding", 3, KEY2),
    read("freq", 3, KEY2),
    conn("help", 2),
    read("idletime", 3, KEY2),
    read("refcount", 3, KEY2),
];

/// `CLIENT`: the proxy answers for the client's own connection and refuses
/// what would see or affect other clients. `NO-TOUCH` and `SETINFO` come from
/// Redis 7.2; they are answered anyway, since client libraries send them
/// during their handshake.
const CLIENT_SUBS: &[CommandSpec] = &[
    refused("caching", 3, LATER).stateful(),
    local("getname", 2, L::ClientGetName),
    refused("getredir", 2, LATER),
    conn("help", 2),
    local("id", 2, L::ClientId),
    local("info", 2, L::ClientInfo),
    refused("kill", -3, OUTSIDE),
    refused("list", -2, OUTSIDE),
    local("no-evict", 3, L::ClientNoEvict).stateful(),
    local("no-touch", 3, L::ClientNoTouch).stateful(),
    refused("pause", -3, OUTSIDE),
    local("reply", 3, L::ClientReply).stateful(),
    local("setinfo", 4, L::ClientSetInfo),
    local("setname", 3, L::ClientSetName),
    refused("tracking", -3, LATER).stateful(),
    refused("trackinginfo", 2, LATER),
    refused("unblock", -3, OUTSIDE),
    refused("unpause", 2, OUTSIDE),
];

/// `ACL`: the upstream's users are the proxy's business, not the client's.
const ACL_SUBS: &[CommandSpec] = &[
    refused("cat", -2, SERVER_ADMIN),
    refused("deluser", -3, SERVER_ADMIN),
    refused("dryrun", -4, SERVER_ADMIN),
    refused("genpass", -2, SERVER_ADMIN),
    refused("getuser", 3, SERVER_ADMIN),
    refused("help", 2, SERVER_ADMIN),
    refused("list", 2, SERVER_ADMIN),
    refused("load", 2, SERVER_ADMIN),
    refused("log", -2, SERVER_ADMIN),
    refused("save", 2, SERVER_ADMIN),
    refused("setuser", -3, SERVER_ADMIN),
    refused("users", 2, SERVER_ADMIN),
    refused("whoami", 2, SERVER_ADMIN),
];

/// `COMMAND`: answered from this table. `GETKEYSANDFLAGS` would need the key
/// flags, which the table does not carry.
const COMMAND_SUBS: &[CommandSpec] = &[
    local("count", 2, L::CommandCount),
    local("docs", -2, L::CommandDocs),
    local("getkeys", -4, L::CommandGetKeys),
    refused("getkeysandflags", -4, LATER),
    conn("help", 2),
    local("info", -2, L::CommandInfo),
    local("list", -2, L::CommandList),
];

/// `CONFIG`.
const CONFIG_SUBS: &[CommandSpec] = &[
    refused("get", -3, SERVER_ADMIN),
    refused("help", 2, SERVER_ADMIN),
    refused("resetstat", 2, SERVER_ADMIN),
    refused("rewrite", 2, SERVER_ADMIN),
    refused("set", -4, SERVER_ADMIN),
];

/// `LATENCY`.
const LATENCY_SUBS: &[CommandSpec] = &[
    refused("doctor", 2, SERVER_ADMIN),
    refused("graph", 3, SERVER_ADMIN),
    refused("help", 2, SERVER_ADMIN),
    refused("histogram", -2, SERVER_ADMIN),
    refused("history", 3, SERVER_ADMIN),
    refused("latest", 2, SERVER_ADMIN),
    refused("reset", -2, SERVER_ADMIN),
];

/// `MEMORY`: only `USAGE key` concerns the project.
const MEMORY_SUBS: &[CommandSpec] = &[
    refused("doctor", 2, SERVER_ADMIN),
    conn("help", 2),
    refused("malloc-stats", 2, SERVER_ADMIN),
    refused("purge", 2, SERVER_ADMIN),
    refused("stats", 2, SERVER_ADMIN),
    read("usage", -3, KEY2),
];

/// `MODULE`.
const MODULE_SUBS: &[CommandSpec] = &[
    refused("help", 2, SERVER_ADMIN),
    refused("list", 2, SERVER_ADMIN),
    refused("load", -3, SERVER_ADMIN),
    refused("loadex", -3, SERVER_ADMIN),
    refused("unload", 3, SERVER_ADMIN),
];

/// `SLOWLOG`: it would show other projects' commands too.
const SLOWLOG_SUBS: &[CommandSpec] = &[
    refused("get", -2, SERVER_ADMIN),
    refused("help", 2, SERVER_ADMIN),
    refused("len", 2, SERVER_ADMIN),
    refused("reset", 2, SERVER_ADMIN),
];

/// `PUBSUB`: answered for the project's own channels only.
const PUBSUB_SUBS: &[CommandSpec] = &[
    local("channels", -2, L::PubSubChannels(Channels::Global)),
    conn("help", 2),
    local("numpat", 2, L::PubSubNumPat),
    local("numsub", -2, L::PubSubNumSub(Channels::Global)),
    local("shardchannels", -2, L::PubSubChannels(Channels::Shard)),
    local("shardnumsub", -2, L::PubSubNumSub(Channels::Shard)),
];

/// `FUNCTION`: libraries are shared by every project.
const FUNCTION_SUBS: &[CommandSpec] = &[
    refused("delete", 3, SERVER_ADMIN),
    refused("dump", 2, SERVER_ADMIN),
    refused("flush", -2, SERVER_ADMIN),
    refused("help", 2, SERVER_ADMIN),
    refused("kill", 2, SERVER_ADMIN),
    refused("list", -2, SERVER_ADMIN),
    refused("load", -3, SERVER_ADMIN),
    refused("restore", -3, SERVER_ADMIN),
    refused("stats", 2, SERVER_ADMIN),
];

/// `SCRIPT`: the script cache is shared by every project.
const SCRIPT_SUBS: &[CommandSpec] = &[
    refused("debug", 3, SERVER_ADMIN),
    refused("exists", -3, SERVER_ADMIN),
    refused("flush", -2, SERVER_ADMIN),
    refused("help", 2, SERVER_ADMIN),
    refused("kill", 2, SERVER_ADMIN),
    refused("load", 3, SERVER_ADMIN),
];

/// `CLUSTER`.
const CLUSTER_SUBS: &[CommandSpec] = &[
    refused("addslots", -3, SERVER_ADMIN),
    refused("addslotsrange", -4, SERVER_ADMIN),
    refused("bumpepoch", 2, SERVER_ADMIN),
    refused("count-failure-reports", 3, SERVER_ADMIN),
    refused("countkeysinslot", 3, SERVER_ADMIN),
    refused("delslots", -3, SERVER_ADMIN),
    refused("delslotsrange", -4, SERVER_ADMIN),
    refused("failover", -2, SERVER_ADMIN),
    refused("flushslots", 2, SERVER_ADMIN),
    refused("forget", 3, SERVER_ADMIN),
    refused("getkeysinslot", 4, SERVER_ADMIN),
    refused("help", 2, SERVER_ADMIN),
    refused("info", 2, SERVER_ADMIN),
    refused("keyslot", 3, SERVER_ADMIN),
    refused("links", 2, SERVER_ADMIN),
    refused("meet", -4, SERVER_ADMIN),
    refused("myid", 2, SERVER_ADMIN),
    refused("nodes", 2, SERVER_ADMIN),
    refused("replicas", 3, SERVER_ADMIN),
    refused("replicate", 3, SERVER_ADMIN),
    refused("reset", -2, SERVER_ADMIN),
    refused("saveconfig", 2, SERVER_ADMIN),
    refused("set-config-epoch", 3, SERVER_ADMIN),
    refused("setslot", -4, SERVER_ADMIN),
    refused("shards", 2, SERVER_ADMIN),
    refused("slaves", 3, SERVER_ADMIN),
    refused("slots", 2, SERVER_ADMIN),
];
