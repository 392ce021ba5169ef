//! Resolves a container's user in the image's own /etc/passwd and
//! /etc/group, as the CRI expects (`runAsUser` by uid, `image user` by name
//! or `name:group`). The files are image content: parsed leniently, bounded,
//! never trusted to be well formed.

use std::path::Path;

/// The largest passwd or group file read (a real one is a few KiB).
const MAX_FILE: u64 = 4 << 20;

/// The identity a process runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Why a user cannot be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("no user {0:?} in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("no group {0:?} in the image's /etc/group")]
    UnknownGroup(String),
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn read_bounded(path: &Path) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_FILE).read_to_string(&mut s);
    }
    s
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?.to_string();
            let _password = f.next()?;
            let uid = f.next()?.parse().ok()?;
            let gid = f.next()?.parse().ok()?;
            Some(PasswdEntry { name, uid, gid })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?.to_string();
            let _password = f.next()?;
            let gid = f.next()?.parse().ok()?;
            let members = f
                .next()
                .unwrap_or("")
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            Some(GroupEntry { name, gid, members })
        })
        .collect()
}

/// Resolves `user` inside the image rooted at `rootfs`.
///
/// - `username` may be `name`, `uid`, `name:group` or `uid:gid`; when empty,
///   `uid` is used.
/// - `gid` (when set) overrides the primary group.
/// - Supplementary groups: the groups that list the user as a member, plus
///   `additional_gids`.
pub fn resolve(
    rootfs: &Path,
    username: &str,
    uid: u32,
    gid: Option<u32>,
    additional_gids: &[u32],
) -> Result<Identity, UserError> {
    let passwd = parse_passwd(&read_bounded(&rootfs.join("etc/passwd")));
    let groups = parse_group(&read_bounded(&rootfs.join("etc/group")));
    resolve_in(&passwd, &groups, username, uid, gid, additional_gids)
}

fn resolve_in(
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
    username: &str,
    uid: u32,
    gid: Option<u32>,
    additional_gids: &[u32],
) -> Result<Identity, UserError> {
    let (user_part, group_part) = match username.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (username, None),
    };
    let (uid, name, passwd_gid) = if user_part.is_empty() {
        let entry = passwd.iter().find(|e| e.uid == uid);
        (uid, entry.map(|e| e.name.clone()), entry.map(|e| e.gid))
    } else if let Ok(numeric) = user_part.parse::<u32>() {
        let entry = passwd.iter().find(|e| e.uid == numeric);
        (numeric, entry.map(|e| e.name.clone()), entry.map(|e| e.gid))
    } else {
        let entry = passwd
            .iter()
            .find(|e| e.name == user_part)
            .ok_or_else(|| UserError::UnknownUser(user_part.to_string()))?;
        (entry.uid, Some(entry.name.clone()), Some(entry.gid))
    };
    let group_gid = match group_part {
        None | Some("") => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(numeric) => numeric,
            Err(_) => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::UnknownGroup(g.into()))?,
        }),
    };
    let primary = gid.or(group_gid).or(passwd_gid).unwrap_or(0);
    let mut additional: Vec<u32> = Vec::new();
    if let Some(name) = &name {
        additional.extend(
            groups
                .iter()
                .filter(|g| g.members.iter().any(|m| m == name))
                .map(|g| g.gid),
        );
    }
    additional.extend_from_slice(additional_gids);
    additional.retain(|&g| g != primary);
    additional.sort_unstable();
    additional.dedup();
    Ok(Identity {
        uid,
        gid: primary,
        additional_gids: additional,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/var/www:/bin/false\n\
                          broken line\nnobody:x:65534:65534::/:/bin/false\nbad:x:notanumber:1::/:\n";
    const GROUP: &str = "root:x:0:\nwww:x:33:\nstaff:x:50:www,nobody\naudio:x:29:www\nbroken\n";

    fn resolve_test(
        username: &str,
        uid: u32,
        gid: Option<u32>,
        extra: &[u32],
    ) -> Result<Identity, UserError> {
        resolve_in(
            &parse_passwd(PASSWD),
            &parse_group(GROUP),
            username,
            uid,
            gid,
            extra,
        )
    }

    #[test]
    fn names_resolve_to_ids_with_their_groups() {
        let id = resolve_test("www", 0, None, &[]).unwrap();
        assert_eq!(
            id,
            Identity {
                uid: 33,
                gid: 33,
                additional_gids: vec![29, 50]
            }
        );
    }

    #[test]
    fn numeric_uids_take_the_primary_group_from_passwd_or_zero() {
        assert_eq!(resolve_test("", 65534, None, &[]).unwrap().gid, 65534);
        assert_eq!(
            resolve_test("", 1234, None, &[]).unwrap(),
            Identity {
                uid: 1234,
                gid: 0,
                additional_gids: vec![]
            }
        );
        assert_eq!(resolve_test("33", 0, None, &[]).unwrap().uid, 33);
    }

    #[test]
    fn group_parts_and_explicit_gids_override_the_primary_group() {
        assert_eq!(resolve_test("www:staff", 0, None, &[]).unwrap().gid, 50);
        assert_eq!(resolve_test("www:7", 0, None, &[]).unwrap().gid, 7);
        let id = resolve_test("www", 0, Some(100), &[200, 29]).unwrap();
        assert_eq!(id.gid, 100);
        assert_eq!(id.additional_gids, vec![29, 50, 200]);
    }

    #[test]
    fn unknown_names_are_errors_and_junk_lines_are_skipped() {
        assert_eq!(
            resolve_test("ghost", 0, None, &[]),
            Err(UserError::UnknownUser("ghost".into()))
        );
        assert_eq!(
            resolve_test("www:ghosts", 0, None, &[]),
            Err(UserError::UnknownGroup("ghosts".into()))
        );
        assert_eq!(
            resolve_test("bad", 0, None, &[]),
            Err(UserError::UnknownUser("bad".into()))
        );
    }

    #[test]
    fn missing_files_mean_no_names() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            resolve(dir.path(), "", 5, None, &[]).unwrap(),
            Identity {
                uid: 5,
                gid: 0,
                additional_gids: vec![]
            }
        );
        assert!(resolve(dir.path(), "www", 0, None, &[]).is_err());
    }
}
