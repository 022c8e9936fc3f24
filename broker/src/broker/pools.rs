//! Images, pools, and who is entitled to which pool.

use super::{Broker, conflict};
use crate::db::{get_str, new_id};
use crate::error::{Error, Result};
use crate::model::{Actor, Entitlement, Image, Pool, PoolSpec, PrincipalKind, valid_name};

impl Broker {
    pub async fn create_image(&self, actor: &Actor, image: &Image) -> Result<Image> {
        actor.require_admin()?;
        if !valid_name(&image.name) || image.vcpus < 1 || image.memory_mib < 64 {
            return Err(Error::Invalid("image: valid name, vcpus >= 1, memory_mib >= 64".into()));
        }
        let disk_sha256 = match &image.disk {
            Some(disk) => Some(hash_template(disk).await?),
            None => None,
        };
        let id = new_id("i");
        sqlx::query("INSERT INTO images (id, name, kernel, initrd, cmdline, disk, disk_sha256, vcpus, memory_mib, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
            .bind(&id)
            .bind(&image.name)
            .bind(&image.kernel)
            .bind(&image.initrd)
            .bind(&image.cmdline)
            .bind(image.disk.clone())
            .bind(disk_sha256.clone())
            .bind(image.vcpus)
            .bind(image.memory_mib)
            .bind(self.now())
            .execute(&self.db.pool)
            .await
            .map_err(|e| conflict(e, &format!("image {}", image.name)))?;
        self.audit(
            &actor.name,
            "image.create",
            &image.name,
            &format!(
                "kernel={} initrd={} disk={} sha256={}",
                image.kernel,
                image.initrd,
                image.disk.as_deref().unwrap_or("none"),
                disk_sha256.as_deref().unwrap_or("none")
            ),
        )
        .await?;
        Ok(Image { id, disk_sha256, ..image.clone() })
    }

    pub async fn list_images(&self) -> Result<Vec<Image>> {
        let rows = sqlx::query("SELECT * FROM images ORDER BY name").fetch_all(&self.db.pool).await?;
        rows.iter().map(Image::from_row).collect()
    }

    async fn image_by(&self, column: &str, value: &str) -> Result<Image> {
        // `column` is one of two literals chosen by this module, never user input.
        let sql = format!("SELECT * FROM images WHERE {column} = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(value).fetch_optional(&self.db.pool).await?;
        row.as_ref()
            .map(Image::from_row)
            .transpose()?
            .ok_or_else(|| Error::NotFound(format!("image {value}")))
    }

    pub async fn create_pool(&self, actor: &Actor, spec: &PoolSpec) -> Result<Pool> {
        actor.require_admin()?;
        spec.validate()?;
        let spec = &canonical_usb(spec)?;
        let image = self.image_by("name", &spec.image).await?;
        let id = new_id("p");
        let display = if spec.display_name.trim().is_empty() {
            spec.name.clone()
        } else {
            spec.display_name.trim().to_owned()
        };
        sqlx::query(
            "INSERT INTO pools (id, name, display_name, kind, image_id, min_size, max_size, spares, idle_timeout_secs, disconnect_timeout_secs, enabled, alloc_seq, created_at, network, host_ports, lock_on_disconnect, clipboard_to_guest, clipboard_from_guest, file_transfer, usb, usb_auto) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1, 0, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
        )
        .bind(&id)
        .bind(&spec.name)
        .bind(&display)
        .bind(spec.kind.as_str())
        .bind(&image.id)
        .bind(spec.min_size)
        .bind(spec.max_size)
        .bind(spec.spares)
        .bind(spec.idle_timeout_secs)
        .bind(spec.disconnect_timeout_secs)
        .bind(self.now())
        .bind(spec.network.mode())
        .bind(spec.network.ports_text())
        .bind(i64::from(spec.lock_on_disconnect))
        .bind(i64::from(spec.clipboard_to_guest))
        .bind(i64::from(spec.clipboard_from_guest))
        .bind(i64::from(spec.file_transfer))
        .bind(&spec.usb)
        .bind(&spec.usb_auto)
        .execute(&self.db.pool)
        .await
        .map_err(|e| conflict(e, &format!("pool {}", spec.name)))?;
        self.audit(&actor.name, "pool.create", &spec.name, &pool_detail(spec)).await?;
        self.pool(&id).await
    }

    /// Edits sizes, timeouts and display name (the kind is fixed). A new image is a
    /// **recompose**: floating desktops move to it at their next recycle, persistent ones
    /// when an admin recomposes them (or their owner resets them); new desktops get it at once.
    pub async fn update_pool(&self, actor: &Actor, id: &str, spec: &PoolSpec, enabled: bool) -> Result<Pool> {
        actor.require_admin()?;
        spec.validate()?;
        let spec = &canonical_usb(spec)?;
        let pool = self.pool(id).await?;
        self.set_pool_image(actor, &pool, &spec.image).await?;
        let display = if spec.display_name.trim().is_empty() {
            pool.name.clone()
        } else {
            spec.display_name.trim().to_owned()
        };
        sqlx::query(
            "UPDATE pools SET display_name = $1, min_size = $2, max_size = $3, spares = $4, idle_timeout_secs = $5, disconnect_timeout_secs = $6, enabled = $7, network = $8, host_ports = $9, lock_on_disconnect = $10, \
             clipboard_to_guest = $11, clipboard_from_guest = $12, file_transfer = $13, usb = $14, usb_auto = $15 WHERE id = $16",
        )
        .bind(display)
        .bind(spec.min_size)
        .bind(spec.max_size)
        .bind(spec.spares)
        .bind(spec.idle_timeout_secs)
        .bind(spec.disconnect_timeout_secs)
        .bind(i64::from(enabled))
        .bind(spec.network.mode())
        .bind(spec.network.ports_text())
        .bind(i64::from(spec.lock_on_disconnect))
        .bind(i64::from(spec.clipboard_to_guest))
        .bind(i64::from(spec.clipboard_from_guest))
        .bind(i64::from(spec.file_transfer))
        .bind(&spec.usb)
        .bind(&spec.usb_auto)
        .bind(id)
        .execute(&self.db.pool)
        .await?;
        self.audit(
            &actor.name,
            "pool.update",
            &pool.name,
            &format!("{} enabled={enabled}", pool_detail(spec)),
        )
        .await?;
        self.pool(id).await
    }

    /// Recompose: the pool's image becomes `image`. Floating desktops move to it at their next
    /// recycle, persistent ones when an admin recomposes them (or their owner resets them);
    /// new desktops get it at once.
    pub async fn recompose_pool(&self, actor: &Actor, pool_id: &str, image: &str) -> Result<Pool> {
        actor.require_admin()?;
        let pool = self.pool(pool_id).await?;
        self.set_pool_image(actor, &pool, image).await?;
        self.pool(pool_id).await
    }

    async fn set_pool_image(&self, actor: &Actor, pool: &Pool, image: &str) -> Result<()> {
        let image = self.image_by("name", image).await?;
        if image.id == pool.image_id {
            return Ok(());
        }
        sqlx::query("UPDATE pools SET image_id = $1 WHERE id = $2")
            .bind(&image.id)
            .bind(&pool.id)
            .execute(&self.db.pool)
            .await?;
        let before = self.image_by("id", &pool.image_id).await.map(|i| i.name).unwrap_or_default();
        self.audit(&actor.name, "pool.recompose", &pool.name, &format!("image {before} -> {}", image.name))
            .await
    }

    pub async fn pool(&self, id: &str) -> Result<Pool> {
        let row =
            sqlx::query("SELECT * FROM pools WHERE id = $1").bind(id).fetch_optional(&self.db.pool).await?;
        row.as_ref().map(Pool::from_row).transpose()?.ok_or_else(|| Error::NotFound("pool".into()))
    }

    pub async fn pool_by_name(&self, name: &str) -> Result<Pool> {
        let row = sqlx::query("SELECT * FROM pools WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.db.pool)
            .await?;
        row.as_ref().map(Pool::from_row).transpose()?.ok_or_else(|| Error::NotFound(format!("pool {name}")))
    }

    pub async fn list_pools(&self) -> Result<Vec<Pool>> {
        let rows = sqlx::query("SELECT * FROM pools ORDER BY name").fetch_all(&self.db.pool).await?;
        rows.iter().map(Pool::from_row).collect()
    }

    pub async fn entitle(&self, actor: &Actor, pool_id: &str, kind: PrincipalKind, name: &str) -> Result<()> {
        actor.require_admin()?;
        let pool = self.pool(pool_id).await?;
        let principal = match kind {
            PrincipalKind::User => self.user_by_name(name).await?.id,
            PrincipalKind::Group => self.group_or_directory_group(name).await?,
        };
        sqlx::query("INSERT INTO entitlements (pool_id, principal_kind, principal_id) VALUES ($1, $2, $3)")
            .bind(&pool.id)
            .bind(kind.as_str())
            .bind(&principal)
            .execute(&self.db.pool)
            .await
            .map_err(|e| conflict(e, &format!("entitlement of {name}")))?;
        self.audit(&actor.name, "pool.entitle", &pool.name, &format!("{} {name}", kind.as_str())).await
    }

    pub async fn unentitle(
        &self,
        actor: &Actor,
        pool_id: &str,
        kind: PrincipalKind,
        name: &str,
    ) -> Result<()> {
        actor.require_admin()?;
        let pool = self.pool(pool_id).await?;
        let principal = match kind {
            PrincipalKind::User => self.user_by_name(name).await?.id,
            PrincipalKind::Group => self.group_id(name).await?,
        };
        sqlx::query(
            "DELETE FROM entitlements WHERE pool_id = $1 AND principal_kind = $2 AND principal_id = $3",
        )
        .bind(&pool.id)
        .bind(kind.as_str())
        .bind(&principal)
        .execute(&self.db.pool)
        .await?;
        self.audit(&actor.name, "pool.unentitle", &pool.name, &format!("{} {name}", kind.as_str())).await
    }

    pub async fn entitlements(&self, pool_id: &str) -> Result<Vec<Entitlement>> {
        let rows = sqlx::query(
            "SELECT e.principal_kind AS kind, COALESCE(u.name, g.name) AS name FROM entitlements e \
             LEFT JOIN users u ON e.principal_kind = 'user' AND u.id = e.principal_id \
             LEFT JOIN user_groups g ON e.principal_kind = 'group' AND g.id = e.principal_id \
             WHERE e.pool_id = $1 ORDER BY e.principal_kind, name",
        )
        .bind(pool_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind =
                    if get_str(r, "kind")? == "user" { PrincipalKind::User } else { PrincipalKind::Group };
                Ok(Entitlement { kind, name: get_str(r, "name")? })
            })
            .collect()
    }

    /// Pools the user may use: entitled directly or through a group, and enabled.
    pub async fn entitled_pools(&self, actor: &Actor) -> Result<Vec<Pool>> {
        let rows = sqlx::query(
            "SELECT * FROM pools WHERE enabled = 1 AND id IN (SELECT pool_id FROM entitlements WHERE \
             (principal_kind = 'user' AND principal_id = $1) OR \
             (principal_kind = 'group' AND principal_id IN (SELECT group_id FROM group_members WHERE user_id = $1))) ORDER BY display_name",
        )
        .bind(&actor.user_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(Pool::from_row).collect()
    }

    pub(super) async fn is_entitled(&self, actor: &Actor, pool_id: &str) -> Result<bool> {
        Ok(self.entitled_pools(actor).await?.iter().any(|p| p.id == pool_id))
    }
}

fn pool_detail(spec: &PoolSpec) -> String {
    format!(
        "kind={} image={} min={} max={} spares={} idle={}s disconnect={}s network={} host_ports={} lock_on_disconnect={} \
         clipboard_to_guest={} clipboard_from_guest={} file_transfer={} usb={} usb_auto={}",
        spec.kind.as_str(),
        spec.image,
        spec.min_size,
        spec.max_size,
        spec.spares,
        spec.idle_timeout_secs,
        spec.disconnect_timeout_secs,
        spec.network.mode(),
        spec.network.ports_text(),
        spec.lock_on_disconnect,
        spec.clipboard_to_guest,
        spec.clipboard_from_guest,
        spec.file_transfer,
        spec.usb,
        spec.usb_auto
    )
}

/// `spec` with its USB policy and its USB auto-redirect rules as the policy writes itself
/// (`class=08,0525:a4a5`), which is what is stored, audited and sent to hosts (the policy) and
/// clients (the rules, in connection files).
fn canonical_usb(spec: &PoolSpec) -> Result<PoolSpec> {
    Ok(PoolSpec {
        usb: spec.usb_policy()?.to_string(),
        usb_auto: spec.usb_auto_rules()?.to_string(),
        ..spec.clone()
    })
}

/// The SHA-256 of a disk template that the broker can read (the path hosts share), computed
/// off the async threads: a desktop image is gigabytes.
async fn hash_template(path: &str) -> Result<String> {
    if !std::path::Path::new(path).is_absolute() {
        return Err(Error::Invalid(format!("image disk {path:?}: give an absolute path")));
    }
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&owned)?;
        pleiades_protocol::hostapi::template_sha256(&mut file, &mut std::io::sink())
    })
    .await
    .map_err(|e| Error::Invalid(format!("image disk {path:?}: {e}")))?
    .map_err(|e| Error::Invalid(format!("image disk {path:?}: the broker cannot read it to hash it: {e}")))
}
