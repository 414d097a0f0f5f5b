//! Commands for many hash tags at once (every bucket's progress log), in as
//! few round trips as the deployment allows.

use std::collections::BTreeSet;
use std::time::Duration;

use redis::{Cmd, RedisResult, Script, Value};

use super::{Conn, RedisStore};
use crate::resilience::DependencyError;

/// Commands on one hash tag (one cluster slot), answered together.
pub(super) type Group = Vec<Cmd>;

/// Each group's replies, one per command, a command's error reply in place
/// (`Value::ServerError`); `Err` for a group whose pipeline got no answer.
pub(super) type GroupReplies = Vec<RedisResult<Vec<Value>>>;

/// The error code of a command's error reply (`NOGROUP`, `NOSCRIPT`, …).
pub(super) fn error_code(reply: &Value) -> Option<&str> {
    match reply {
        Value::ServerError(e) => Some(e.code()),
        _ => None,
    }
}

/// Every group answered and no command failed: the replies; otherwise the
/// first failure, as an answer (`Refused`) or, for a group that got no
/// answer, a failure.
pub(super) fn all_answered(replies: GroupReplies) -> Result<Vec<Vec<Value>>, DependencyError> {
    let mut all = Vec::with_capacity(replies.len());
    for group in replies {
        let values = group.map_err(|e| DependencyError::Failed("redis", e.to_string()))?;
        if let Some(Value::ServerError(e)) = values.iter().find(|v| matches!(v, Value::ServerError(_))) {
            let e = redis::RedisError::from(e.clone());
            return Err(DependencyError::Refused("redis", e.to_string()));
        }
        all.push(values);
    }
    Ok(all)
}

/// What a group of a primary that failed the outage watch's last look answers.
const UNANSWERED: &str = "the primary serving this slot failed the outage watch's last look";

/// One pipeline per group, all sent at once on the multiplexed connection.
/// A group not answered within `patience` answers a timeout in its place:
/// the others are not held back by a node that hangs (one paused primary
/// would otherwise make the whole call, and every bucket's progress log,
/// wait out the guard's timeout and fail).
async fn query_each(
    conn: &Conn,
    groups: &[Group],
    skipped: &[bool],
    patience: Duration,
) -> Vec<RedisResult<Vec<Value>>> {
    let calls = groups.iter().enumerate().map(|(at, group)| {
        let mut conn = conn.clone();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for cmd in group {
            pipe.add_command(cmd.clone());
        }
        let skip = skipped.get(at).copied().unwrap_or(false);
        async move {
            if group.is_empty() {
                return Ok(Vec::new());
            }
            if skip {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, UNANSWERED).into());
            }
            match tokio::time::timeout(patience, pipe.query_async::<Vec<Value>>(&mut conn)).await {
                Ok(reply) => reply,
                Err(_) => {
                    let first = group.first().map(super::command_name).unwrap_or_default();
                    let error = format!("the node serving this slot did not answer ({first}, …)");
                    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, error).into())
                }
            }
        }
    });
    futures::future::join_all(calls).await
}

/// Every group in one pipeline (a single node serves every slot).
async fn query_together(conn: &mut Conn, groups: &[Group]) -> RedisResult<GroupReplies> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for cmd in groups.iter().flatten() {
        pipe.add_command(cmd.clone());
    }
    if groups.iter().all(Vec::is_empty) {
        return Ok(groups.iter().map(|_| Ok(Vec::new())).collect());
    }
    let mut replies = pipe.query_async::<Vec<Value>>(conn).await?.into_iter();
    Ok(groups
        .iter()
        .map(|group| Ok(replies.by_ref().take(group.len()).collect()))
        .collect())
}

/// The plain arguments of `group`'s commands, where its keys are.
fn simple_args(group: &Group) -> impl Iterator<Item = &[u8]> {
    (group.iter().flat_map(|cmd| cmd.args_iter())).filter_map(|arg| match arg {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    })
}

impl RedisStore {
    /// Whether `group`'s keys are on a primary that failed the outage
    /// watch's last look.
    fn group_failing(&self, group: &Group) -> bool {
        // Looked for only while a primary fails; no slot is past 16383.
        self.outages
            .primary_failing(|| super::keys::slot_of_first_key(simple_args(group)).unwrap_or(u16::MAX))
    }

    /// Runs `groups`, each on one hash tag, as one guarded call. A single
    /// node takes them all as one pipeline: one round trip. A cluster
    /// pipeline may not span slots, so in cluster mode each group is its own
    /// pipeline, all sent at once (the cluster connection multiplexes them
    /// per node): still one round-trip time. A group whose node does not
    /// answer (unreachable, failing over) answers `Err` while the others
    /// answer; only when no group is answered is the call a failure.
    ///
    /// `script`: commands answered `NOSCRIPT` (Redis restarted, or flushed
    /// its scripts) are `EVALSHA`s of it, run once more after loading it.
    pub(super) async fn run_grouped(
        &self,
        groups: Vec<Group>,
        script: Option<&Script>,
    ) -> Result<GroupReplies, DependencyError> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let cluster = self.is_cluster();
        // Short of the guard's timeout, so that what answered comes back.
        let patience = self.guard.timeout() * 3 / 4;
        // Groups of a primary that failed the outage watch's last look are
        // not sent: each would wait out `patience`, and a call holding only
        // such groups would count against the breaker every user shares.
        let skipped: Vec<bool> = match cluster {
            true => groups.iter().map(|group| self.group_failing(group)).collect(),
            false => Vec::new(),
        };
        if !skipped.is_empty() && skipped.iter().all(|&s| s) {
            return Err(DependencyError::Failed("redis", UNANSWERED.to_owned()));
        }
        self.run(super::On::Anything, |mut conn| async move {
            let mut replies = if cluster {
                let replies = query_each(&conn, &groups, &skipped, patience).await;
                if let Some(Err(e)) = replies.iter().find(|r| r.is_err()) {
                    if replies.iter().all(|r| r.is_err()) {
                        return Err(e.clone());
                    }
                    // The others answered; that node's hang still is one.
                    if super::is_outage(e) {
                        self.outages.call_failed();
                    }
                }
                replies
            } else {
                query_together(&mut conn, &groups).await?
            };
            if let Some(script) = script {
                again_without_noscript(&mut conn, cluster, patience, script, &groups, &mut replies).await?;
            }
            Ok(replies)
        })
        .await
    }
}

/// Loads `script` and runs again the commands answered `NOSCRIPT`, putting
/// their new replies in place.
async fn again_without_noscript(
    conn: &mut Conn,
    cluster: bool,
    patience: Duration,
    script: &Script,
    groups: &[Group],
    replies: &mut GroupReplies,
) -> RedisResult<()> {
    // (group, the places of its commands answered NOSCRIPT)
    let todo: Vec<(usize, Vec<usize>)> = replies
        .iter()
        .enumerate()
        .filter_map(|(g, reply)| {
            let at: Vec<usize> = reply
                .as_ref()
                .ok()?
                .iter()
                .enumerate()
                .filter(|(_, v)| error_code(v) == Some("NOSCRIPT"))
                .map(|(i, _)| i)
                .collect();
            (!at.is_empty()).then_some((g, at))
        })
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let retry: Vec<Group> = todo
        .iter()
        .map(|(g, at)| {
            let group = groups.get(*g).map(Vec::as_slice).unwrap_or_default();
            at.iter().filter_map(|&i| group.get(i).cloned()).collect()
        })
        .collect();
    if cluster {
        // On the primaries of the groups that need it: `SCRIPT LOAD` alone
        // goes to every primary, and one that hangs failed every group. A
        // load that fails leaves its groups answering `NOSCRIPT` again.
        let slots: BTreeSet<u16> = (retry.iter())
            .filter_map(|group| super::keys::slot_of_first_key(simple_args(group)))
            .collect();
        futures::future::join_all(slots.into_iter().map(|slot| {
            let mut aimed = conn.clone();
            if let Conn::Cluster(_, at) = &mut aimed {
                *at = Some(slot);
            }
            async move { tokio::time::timeout(patience, script.load_async(&mut aimed)).await }
        }))
        .await;
    } else {
        script.load_async(conn).await?;
    }
    let again = if cluster {
        query_each(conn, &retry, &[], patience).await
    } else {
        query_together(conn, &retry).await?
    };
    for ((g, at), result) in todo.into_iter().zip(again) {
        let Some(reply) = replies.get_mut(g) else { continue };
        match (reply.as_mut(), result) {
            (Ok(values), Ok(new)) => {
                for (i, value) in at.into_iter().zip(new) {
                    if let Some(old) = values.get_mut(i) {
                        *old = value;
                    }
                }
            }
            (_, Err(e)) => *reply = Err(e),
            (Err(_), Ok(_)) => {}
        }
    }
    Ok(())
}
