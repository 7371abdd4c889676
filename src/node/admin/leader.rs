//! Leader transfer.

use super::*;

impl Node {
    /// Hands leadership of `shard` (led here) to `to`, waiting until it
    /// leads (or another node does).
    ///
    /// openraft's leader transfer: the leader stops accepting writes, tells
    /// every member, and `to` campaigns once its log holds what the leader
    /// had flushed. Tried again a few times when another node wins.
    pub(crate) async fn hand_over(&self, shard: ShardId, to: NodeId) -> Result<(), AdminError> {
        let raft = self.led(shard).await?;
        let mut last = String::new();
        for _ in 0..5 {
            if let Err(e) = raft.trigger().transfer_leader(to).await {
                return Err(raft_error(shard, e));
            }
            let moved = raft
                .wait(Some(Duration::from_secs(5)))
                .metrics(
                    |m| m.current_leader.is_some() && m.current_leader != Some(self.id),
                    "transfer: another node leads",
                )
                .await;
            match moved {
                Ok(m) if m.current_leader == Some(to) => return Ok(()),
                Ok(m) => last = format!("{:?} leads instead", m.current_leader),
                Err(e) => last = e.to_string(),
            }
            if !leadership(&raft, self.id).0 {
                // Another node won; the caller checks who.
                return Ok(());
            }
        }
        Err(AdminError::Unavailable {
            shard,
            reason: format!("leadership did not move to {to}: {last}"),
        })
    }

    /// Makes `to` the leader of `shard` (run on its leader).
    ///
    /// # Errors
    /// [`AdminError::Refused`] when `to` is not a voter of the shard.
    pub async fn transfer_leader(&self, shard: ShardId, to: NodeId) -> Result<(), AdminError> {
        if let Some(b) = self.registry.batch_for(shard).cloned() {
            return b.transfer_leader(self.id, shard, to).await;
        }
        let raft = self.led(shard).await?;
        if to == self.id {
            return Ok(());
        }
        let voter = raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == to);
        if !voter {
            return Err(AdminError::Refused(format!(
                "{to} is not a voter of {shard}"
            )));
        }
        self.hand_over(shard, to).await?;
        let now = raft.metrics().borrow_watched().current_leader;
        if now == Some(to) {
            Ok(())
        } else {
            Err(AdminError::Unavailable {
                shard,
                reason: format!("{now:?} won the election instead of {to}"),
            })
        }
    }
}
